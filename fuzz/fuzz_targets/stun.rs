//! STUN datagrams from anyone on the internet: parsing and answering never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexodus::wire::stun;

fuzz_target!(|data: &[u8]| {
    let _ = stun::is_stun(data);
    if let Ok(p) = stun::Packet::new_checked(data) {
        let _ = (p.class(), p.method(), p.transaction_id());
        for attr in p.attributes() {
            if attr.is_err() {
                break;
            }
        }
    }
    let _ = stun::parse_binding_request(data);
    let _ = stun::parse_binding_response(data);
    let mut out = [0u8; 64];
    let src = "192.0.2.1:3478".parse().expect("literal");
    let _ = stun::respond(data, src, &mut out);
    let src6 = "[2001:db8::1]:3478".parse().expect("literal");
    let _ = stun::respond(data, src6, &mut out);
});
