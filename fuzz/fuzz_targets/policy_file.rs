//! The policy file parser and compiler under arbitrary input: `Policy::parse` must
//! return a policy or an error, never panic; a policy that parses compiles for each
//! of a few devices (dual-stack, v4-only, a subnet router), and the tables answer
//! for addresses of both families without panicking. Contracts: a compiled table
//! never lets a v4 source reach a v6 destination or the other way round, and it
//! never covers a destination that is neither the node's nor its LAN's.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use nexodus::policy::{DeviceInfo, Policy, compile};

fn device(name: &str, v4: &str, v6: Option<&str>, routes: &[&str]) -> DeviceInfo {
    DeviceInfo {
        hostname: name.into(),
        v4: v4.parse().expect("v4"),
        v6: v6.map(|a| a.parse().expect("v6")),
        routes: routes.iter().map(|r| r.parse().expect("route")).collect(),
        exit: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text) else {
        return;
    };
    let devices = [
        device("web1", "100.64.0.1", Some("fd00::1"), &[]),
        device("db1", "100.64.0.2", Some("fd00::2"), &[]),
        device("ops1", "100.64.0.3", None, &[]),
        device(
            "router1",
            "100.64.0.4",
            Some("fd00::4"),
            &["198.51.100.0/24", "2001:db8:7::/48"],
        ),
    ];
    let sources: [IpAddr; 6] = [
        "100.64.0.1".parse().expect("ip"),
        "fd00::3".parse().expect("ip"),
        "198.51.100.9".parse().expect("ip"),
        "2001:db8:100::1".parse().expect("ip"),
        "0.0.0.0".parse().expect("ip"),
        "::ffff:100.64.0.1".parse().expect("ip"),
    ];
    let foreign: [IpAddr; 2] = [
        "203.0.113.1".parse().expect("ip"),
        "2001:db8:ffff::1".parse().expect("ip"),
    ];
    for me in &devices {
        let table = compile(&policy, &devices, me);
        assert!(table.len() <= policy.allow.len());
        let mut dsts: Vec<IpAddr> = vec![me.v4.into()];
        dsts.extend(me.v6.map(IpAddr::from));
        dsts.extend(me.routes.iter().map(|r| r.addr()));
        for &src in &sources {
            for proto in [1u8, 6, 17, 58, 132] {
                for port in [None, Some(22), Some(5432), Some(8050)] {
                    for &dst in &dsts {
                        let ok = table.allows(src, dst, proto, port);
                        if src.is_ipv4() != dst.is_ipv4() {
                            assert!(!ok, "mixed families {src} -> {dst}");
                        }
                    }
                    for &dst in &foreign {
                        assert!(!table.allows(src, dst, proto, port), "foreign {dst}");
                    }
                }
            }
        }
    }
});
