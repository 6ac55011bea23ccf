//! What the peer benches share: N distinct devices as a coordinator's snapshot
//! carries them.

use nexodus::coord::keys::encode_key;
use nexodus::wire::control::Device;
use sha2::Digest;

pub fn key(n: u64) -> [u8; 32] {
    let secret: [u8; 32] = sha2::Sha256::digest(n.to_le_bytes()).into();
    *boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(secret)).as_bytes()
}

pub fn device(id: i64) -> Device {
    let n = id as u32;
    Device {
        use_exit: None,
        id,
        organization_id: 1,
        public_key: encode_key(&key(id as u64)),
        hostname: format!("node{id}"),
        os: "linux".into(),
        tunnel_ip: std::net::Ipv4Addr::from(0x6440_0000 + n),
        tunnel_ip_v6: Some(std::net::Ipv6Addr::from(0x0200_u128 << 112 | u128::from(n))),
        organization_prefix: "100.64.0.0/10".parse().expect("literal"),
        organization_prefix_v6: "200::/64".parse().expect("literal"),
        local_ip: None,
        local_ip_v6: None,
        endpoints: vec![std::net::SocketAddr::from((
            [192, 0, 2, (n % 250) as u8 + 1],
            51820,
        ))],
        reflexive_endpoint: None,
        reflexive_endpoint_v6: None,
        symmetric_nat: false,
        relay: false,
        relay_only: false,
        ipv6_supported: true,
        advertise_cidrs: vec![],
        revision: 1,
        last_seen: 0,
        unmanaged: false,
        online: true,
        exit_node: false,
        approved: Default::default(),
        name: format!("node{id}"),
        domain: "nexodus.internal".into(),
    }
}
