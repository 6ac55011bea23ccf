use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::*;

/// A device record as the coordinator sends it.
pub(crate) fn device(id: i64, name: &str, v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> Device {
    Device {
        use_exit: None,
        id,
        organization_id: 1,
        public_key: String::new(),
        hostname: name.to_uppercase(),
        os: "linux".into(),
        tunnel_ip: v4,
        tunnel_ip_v6: v6,
        organization_prefix: "100.64.0.0/10".parse().unwrap(),
        organization_prefix_v6: "200::/64".parse().unwrap(),
        local_ip: None,
        local_ip_v6: None,
        endpoints: vec![],
        reflexive_endpoint: None,
        reflexive_endpoint_v6: None,
        symmetric_nat: false,
        relay: false,
        relay_only: false,
        ipv6_supported: v6.is_some(),
        advertise_cidrs: vec![],
        revision: 1,
        last_seen: 0,
        unmanaged: false,
        online: true,
        exit_node: false,
        approved: Default::default(),
        name: name.into(),
        domain: "nexodus.internal".into(),
    }
}

pub(crate) fn table() -> NameTable {
    let devices = [
        device(
            1,
            "alpha",
            Ipv4Addr::new(100, 64, 0, 1),
            Some("200::1".parse().unwrap()),
        ),
        device(2, "beta", Ipv4Addr::new(100, 64, 0, 2), None),
    ];
    NameTable::from_devices("nexodus.internal", &devices)
}

pub(crate) fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x1234;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn ask(name: &str, qtype: RecordType) -> Message {
    let out = answer(&table(), &query(name, qtype)).expect("an answer");
    Message::from_vec(&out).unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_and_aaaa_of_a_dual_stack_device() {
    let m = ask("alpha.nexodus.internal.", RecordType::A);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_desired);
    assert_eq!(addrs(&m), ["100.64.0.1"]);
    assert_eq!(m.answers[0].ttl, TTL);
    assert_eq!(m.queries.len(), 1);
    let m = ask("alpha.nexodus.internal.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), ["200::1"]);
}

#[test]
fn names_are_case_insensitive() {
    let m = ask("ALPHA.Nexodus.INTERNAL.", RecordType::A);
    assert_eq!(addrs(&m), ["100.64.0.1"]);
    let m = ask("alpha.nexodus.internal", RecordType::A);
    assert_eq!(addrs(&m), ["100.64.0.1"]);
}

#[test]
fn a_v4_only_device_has_no_aaaa_but_exists() {
    let m = ask("beta.nexodus.internal.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = ask("beta.nexodus.internal.", RecordType::A);
    assert_eq!(addrs(&m), ["100.64.0.2"]);
}

#[test]
fn other_types_of_a_device_are_nodata() {
    for t in [RecordType::MX, RecordType::TXT, RecordType::ANY] {
        let m = ask("alpha.nexodus.internal.", t);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
        assert!(m.answers.is_empty(), "{t}");
    }
    let m = ask("nexodus.internal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[test]
fn unknown_names_in_the_domain_are_nxdomain() {
    for name in ["gamma.nexodus.internal.", "x.alpha.nexodus.internal."] {
        let m = ask(name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
    }
}

#[test]
fn names_outside_the_domain_are_refused() {
    for name in [
        "example.com.",
        "alpha.internal.",
        "alpha.nexodus.internal.evil.",
        "internal.",
        ".",
    ] {
        let m = ask(name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(m.answers.is_empty());
    }
    // An empty table (no domain yet) answers nothing.
    let out = answer(
        &NameTable::default(),
        &query("alpha.nexodus.internal.", RecordType::A),
    )
    .unwrap();
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let good = query("alpha.nexodus.internal.", RecordType::A);
    // Too short for a header, too long, or a response: nothing.
    assert_eq!(answer(&table(), &good[..11]), None);
    assert_eq!(answer(&table(), &vec![0; MAX_QUERY + 1]), None);
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(answer(&table(), &response), None);
    // A header whose question is cut: FORMERR with the query's id.
    let out = answer(&table(), &good[..good.len() - 3]).unwrap();
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Two questions: FORMERR.
    let mut two = Message::from_vec(&good).unwrap();
    two.add_query(Query::query(
        Name::from_ascii("beta.nexodus.internal.").unwrap(),
        RecordType::A,
    ));
    let m = Message::from_vec(&answer(&table(), &two.to_vec().unwrap()).unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
}

#[test]
fn other_opcodes_and_classes_are_refused_or_not_implemented() {
    let mut m = Message::from_vec(&query("alpha.nexodus.internal.", RecordType::A)).unwrap();
    m.metadata.op_code = OpCode::Status;
    let out = Message::from_vec(&answer(&table(), &m.to_vec().unwrap()).unwrap()).unwrap();
    assert_eq!(out.metadata.response_code, ResponseCode::NotImp);
    let mut m = Message::query();
    let mut q = Query::query(
        Name::from_ascii("alpha.nexodus.internal.").unwrap(),
        RecordType::A,
    );
    q.set_query_class(DNSClass::CH);
    m.add_query(q);
    let out = Message::from_vec(&answer(&table(), &m.to_vec().unwrap()).unwrap()).unwrap();
    assert_eq!(out.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn lookups_for_socks_and_egress() {
    let t = table();
    assert_eq!(t.domain(), "nexodus.internal");
    assert_eq!(t.len(), 2);
    let a = t.resolve("Alpha.nexodus.internal.").unwrap();
    assert_eq!(a.v4, Ipv4Addr::new(100, 64, 0, 1));
    assert_eq!(t.resolve("beta.nexodus.internal").unwrap().v6, None);
    assert_eq!(t.lookup("gamma.nexodus.internal"), Lookup::Unknown);
    assert_eq!(t.lookup("example.com"), Lookup::Outside);
    assert_eq!(t.lookup("nexodus.internal"), Lookup::Apex);
    // Unnamed devices (an older coordinator) are not in the table.
    let mut d = device(3, "", Ipv4Addr::new(100, 64, 0, 3), None);
    d.name.clear();
    assert!(NameTable::from_devices("nexodus.internal", [&d]).is_empty());
}
