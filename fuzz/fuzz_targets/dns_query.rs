//! DNS queries from any mesh peer to the node's resolver (`node::dns::answer`):
//! never a panic; a malformed query gets FORMERR or nothing; every answer is a
//! well-formed response to the query's id with at most one record.
#![no_main]

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use libfuzzer_sys::fuzz_target;
use nexodus::node::dns::{self, NameTable};
use nexodus::wire::control::Device;

fn table() -> NameTable {
    let device = |id: i64, name: &str, v6: Option<&str>| -> Device {
        let mut d: Device = serde_json::from_value(serde_json::json!({
            "id": id, "organization_id": 1, "public_key": "", "hostname": name, "os": "linux",
            "tunnel_ip": Ipv4Addr::new(100, 64, 0, id as u8), "tunnel_ip_v6": v6,
            "organization_prefix": "100.64.0.0/10", "organization_prefix_v6": "200::/64",
            "symmetric_nat": false, "relay": false, "relay_only": false,
            "ipv6_supported": v6.is_some(), "revision": 1, "last_seen": 0,
        }))
        .expect("literal device");
        d.name = name.into();
        d
    };
    let devices = [device(1, "alpha", Some("200::1")), device(2, "beta", None)];
    NameTable::from_devices("nexodus.internal", &devices)
}

fuzz_target!(|data: &[u8]| {
    let table = table();
    let Some(out) = dns::answer(&table, data) else {
        return;
    };
    let m = Message::from_vec(&out).expect("our answers parse");
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]));
    assert!(m.answers.len() <= 1);
    if Message::from_vec(data).is_err() {
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
});
