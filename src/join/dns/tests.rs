use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::*;
use crate::wire::control::Device;

fn device(id: i64, name: &str, v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> Device {
    let mut d: Device = serde_json::from_value(serde_json::json!({
        "id": id, "organization_id": 1, "public_key": "", "hostname": name, "os": "linux",
        "tunnel_ip": v4, "tunnel_ip_v6": v6, "organization_prefix": "100.64.0.0/10",
        "organization_prefix_v6": "200::/64", "symmetric_nat": false, "relay": false,
        "relay_only": false, "ipv6_supported": v6.is_some(), "revision": 1, "last_seen": 0,
    }))
    .unwrap();
    d.name = name.into();
    d.domain = "nexodus.internal".into();
    d
}

fn table(devices: &[Device]) -> Arc<NameTable> {
    Arc::new(NameTable::from_devices("nexodus.internal", devices))
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

/// (rcode, addresses) of an answer.
fn read(bytes: &[u8]) -> (ResponseCode, Vec<String>) {
    let m = Message::from_vec(bytes).unwrap();
    let addrs = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    (m.metadata.response_code, addrs)
}

struct Server {
    udp: SocketAddr,
    tcp: SocketAddr,
    names: watch::Sender<Arc<NameTable>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn server() -> Server {
    let devices = [
        device(
            1,
            "alpha",
            Ipv4Addr::new(100, 64, 0, 1),
            Some("200::1".parse().unwrap()),
        ),
        device(2, "beta", Ipv4Addr::new(100, 64, 0, 2), None),
    ];
    let (names, rx) = watch::channel(table(&devices));
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (u, t) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let slots = Arc::new(Semaphore::new(2));
    Server {
        udp: u,
        tcp: t,
        names,
        tasks: vec![
            tokio::spawn(serve_udp(udp, rx.clone())),
            tokio::spawn(serve_tcp(tcp, rx, slots)),
        ],
    }
}

async fn ask_udp(server: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(q, server).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

async fn ask_tcp(stream: &mut TcpStream, q: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(q.len()).unwrap().to_be_bytes();
    stream.write_all(&len).await.ok()?;
    stream.write_all(q).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut out = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut out).await.ok()?;
    Some(out)
}

/// Every answer case, over UDP and over one TCP connection that carries them all.
#[tokio::test]
async fn every_case_over_udp_and_tcp() {
    let s = server().await;
    let cases: [(&str, RecordType, ResponseCode, &[&str]); 6] = [
        (
            "alpha.nexodus.internal.",
            RecordType::A,
            ResponseCode::NoError,
            &["100.64.0.1"],
        ),
        (
            "alpha.nexodus.internal.",
            RecordType::AAAA,
            ResponseCode::NoError,
            &["200::1"],
        ),
        (
            "beta.nexodus.internal.",
            RecordType::A,
            ResponseCode::NoError,
            &["100.64.0.2"],
        ),
        (
            "beta.nexodus.internal.",
            RecordType::AAAA,
            ResponseCode::NoError,
            &[],
        ),
        (
            "gamma.nexodus.internal.",
            RecordType::A,
            ResponseCode::NXDomain,
            &[],
        ),
        ("example.com.", RecordType::A, ResponseCode::Refused, &[]),
    ];
    let mut tcp = TcpStream::connect(s.tcp).await.unwrap();
    for (name, qtype, rcode, addrs) in cases {
        let q = query(name, qtype);
        let want = (
            rcode,
            addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        let udp = ask_udp(s.udp, &q).await.expect("a UDP answer");
        assert_eq!(read(&udp), want, "UDP {name} {qtype}");
        let tcp = ask_tcp(&mut tcp, &q).await.expect("a TCP answer");
        assert_eq!(read(&tcp), want, "TCP {name} {qtype}");
    }
    // Malformed: FORMERR over both; no header: nothing over UDP, closed over TCP.
    let q = query("alpha.nexodus.internal.", RecordType::A);
    let cut = &q[..q.len() - 3];
    assert_eq!(
        read(&ask_udp(s.udp, cut).await.unwrap()).0,
        ResponseCode::FormErr
    );
    assert_eq!(
        read(&ask_tcp(&mut tcp, cut).await.unwrap()).0,
        ResponseCode::FormErr
    );
    assert_eq!(ask_udp(s.udp, &[1, 2, 3]).await, None);
    assert_eq!(ask_tcp(&mut tcp, &[1, 2, 3]).await, None);
}

/// A new table is answered from at once.
#[tokio::test]
async fn new_names_are_answered_at_once() {
    let s = server().await;
    let q = query("gamma.nexodus.internal.", RecordType::A);
    assert_eq!(
        read(&ask_udp(s.udp, &q).await.unwrap()).0,
        ResponseCode::NXDomain
    );
    s.names.send_replace(table(&[device(
        3,
        "gamma",
        Ipv4Addr::new(100, 64, 0, 3),
        None,
    )]));
    assert_eq!(
        read(&ask_udp(s.udp, &q).await.unwrap()),
        (ResponseCode::NoError, vec!["100.64.0.3".to_string()])
    );
    let mut tcp = TcpStream::connect(s.tcp).await.unwrap();
    assert_eq!(
        read(&ask_tcp(&mut tcp, &q).await.unwrap()).0,
        ResponseCode::NoError
    );
}

#[test]
fn without_systemd_resolved_nothing_changes() {
    let missing = Path::new("/nonexistent/io.systemd.Resolve");
    assert!(
        SplitDns::install_with(
            missing,
            "dn0",
            Ipv4Addr::new(100, 64, 0, 1),
            "nexodus.internal"
        )
        .is_none()
    );
}
