//! End-to-end robustness of the data path: every packet size up to the interface MTU
//! (and a smaller route MTU) passes with DF set; outer datagrams carry WireGuard's
//! padding (plaintext padded to 16, capped at the MTU) both between managed nodes and
//! with a stock wireguard-go peer; reordered and duplicated underlay datagrams never
//! reach TUN twice. Needs root, tcpdump, iperf3, wireguard-go and wireguard-tools.
//! Reordering and duplication are done by a userspace stand-in for `tc netem` (see
//! [`Impair`]), since test kernels may be built without sch_netem.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, wait_until};
use common::netns::Netns;
use common::proc::Proc;
use common::stock::stock_host;
use common::{Deadline, DieWithParent};
use nexodus::join::status::Status;

/// The TUN MTU nexodus sets (and wireguard-go's default).
const MTU: usize = 1420;
/// WireGuard data message overhead: 16-byte header and 16-byte tag.
const OVERHEAD: usize = 32;
const WG_PORT: &str = "51820";
const PING_WAIT: Duration = Duration::from_secs(30);

/// Pings `addr` from `ns` once per size with DF set (`-M do`), each with a 1 s
/// deadline and one retry with 2 s. The shell loop keeps it to one fork per ping.
fn start_sweep(ns: &Netns, addr: &str, sizes: &[usize], out: PathBuf) -> Proc {
    let script = "a=$1; shift; for s in \"$@\"; do \
                  ping -n -q -M do -c 1 -W 1 -s $s $a >/dev/null 2>&1 && continue; \
                  echo retry $s; \
                  ping -n -q -M do -c 1 -W 2 -s $s $a >/dev/null 2>&1 || echo fail $s; \
                  done; echo done";
    let mut cmd = ns.cmd(&["sh", "-c", script, "sweep", addr]);
    cmd.args(sizes.iter().map(ToString::to_string));
    Proc::spawn(cmd, out)
}

/// Sizes that needed a retry; panics if a size was never answered.
fn finish_sweep(p: Proc, what: &str, timeout: Duration) -> Vec<usize> {
    let (ok, out) = p.finish(timeout);
    assert!(
        ok && out.lines().any(|l| l == "done"),
        "{what}: sweep did not finish in {timeout:?}: {out}"
    );
    let sizes = |tag: &str| -> Vec<usize> {
        out.lines()
            .filter_map(|l| l.strip_prefix(tag)?.trim().parse().ok())
            .collect()
    };
    let failed = sizes("fail ");
    assert!(
        failed.is_empty(),
        "{what}: sizes never answered: {failed:?}"
    );
    sizes("retry ")
}

/// Runs sweeps concurrently (from, to address, sizes, label) and checks each.
fn sweeps(jobs: &[(&Netns, &str, Vec<usize>, &str)], scratch: &Path, timeout: Duration) {
    let procs: Vec<_> = jobs
        .iter()
        .enumerate()
        .map(|(i, (ns, addr, sizes, _))| {
            start_sweep(ns, addr, sizes, scratch.join(format!("sweep{i}.out")))
        })
        .collect();
    let started = Instant::now();
    for (p, (_, _, sizes, what)) in procs.into_iter().zip(jobs) {
        let retried = finish_sweep(p, what, timeout);
        eprintln!(
            "{what}: {} sizes answered ({} after a retry: {retried:?})",
            sizes.len(),
            retried.len()
        );
    }
    eprintln!("sweeps took {:?}", started.elapsed());
}

/// A DF ping of `size` to `addr` is refused locally: it exceeds the path MTU.
fn assert_too_big(ns: &Netns, addr: &str, size: usize) {
    let out = ns
        .cmd(&[
            "ping",
            "-n",
            "-M",
            "do",
            "-c",
            "1",
            "-W",
            "1",
            "-s",
            &size.to_string(),
            addr,
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && text.to_lowercase().contains("too long"),
        "ping -M do -s {size} {addr} should be refused as too long: {text}"
    );
}

/// One UDP datagram from a capture.
#[derive(Debug, Clone)]
struct Udp {
    src: IpAddr,
    dst: IpAddr,
    /// UDP payload length (from the UDP header).
    len: usize,
    /// The first bytes of the payload.
    head: Vec<u8>,
    /// The whole IP datagram's length.
    wire: usize,
}

impl Udp {
    /// The WireGuard message type (1..=4, followed by three zero bytes).
    fn wg_type(&self) -> Option<u8> {
        match self.head.get(..4)? {
            [t @ 1..=4, 0, 0, 0] => Some(*t),
            _ => None,
        }
    }

    fn is_data(&self) -> bool {
        self.wg_type() == Some(4)
    }
}

/// Parses a classic pcap file of Ethernet frames (as much of it as is complete).
fn parse_pcap(bytes: &[u8]) -> Vec<Udp> {
    let mut out = Vec::new();
    let Some(magic) = bytes.get(..4) else {
        return out;
    };
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file: {:?}", &bytes[..bytes.len().min(16)]),
    };
    let u32_at = |b: &[u8], at: usize| -> usize {
        let w: [u8; 4] = b[at..at + 4].try_into().unwrap();
        (if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }) as usize
    };
    assert_eq!(u32_at(bytes, 20), 1, "link type is not Ethernet");
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let incl = u32_at(bytes, at + 8);
        let Some(frame) = bytes.get(at + 16..at + 16 + incl) else {
            break;
        };
        at += 16 + incl;
        if let Some(u) = parse_frame(frame) {
            out.push(u);
        }
    }
    out
}

fn parse_frame(f: &[u8]) -> Option<Udp> {
    let ethertype = u16::from_be_bytes(f.get(12..14)?.try_into().ok()?);
    let ip = f.get(14..)?;
    let (src, dst, iphdr, udp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let frag = u16::from_be_bytes(ip.get(6..8)?.try_into().ok()?);
            if ip.get(9) != Some(&17) || frag & 0x1fff != 0 {
                return None;
            }
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), ihl, ip.get(ihl..)?)
        }
        0x86dd => {
            if ip.get(6) != Some(&17) {
                return None;
            }
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), 40, ip.get(40..)?)
        }
        _ => return None,
    };
    let len = usize::from(u16::from_be_bytes(udp.get(4..6)?.try_into().ok()?)).checked_sub(8)?;
    let head = udp.get(8..udp.len().min(12))?.to_vec();
    Some(Udp {
        src,
        dst,
        len,
        head,
        wire: iphdr + 8 + len,
    })
}

/// tcpdump writing a pcap of `filter` on `dev` to a file; killed on drop.
struct Capture {
    proc: Proc,
    pcap: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, dev: &str, filter: &str, dir: &Path, name: &str) -> Self {
        // UDP GSO trains would be captured as one super-packet: segment them before
        // the tap, so the capture shows the datagrams as they go on the wire.
        ns.ok(&["ip", "link", "set", dev, "gso_max_segs", "1"]);
        let pcap = dir.join(format!("{name}.pcap"));
        let log = dir.join(format!("{name}.tcpdump.log"));
        // The pcap goes to stdout (a file we opened), so tcpdump's privilege drop and
        // any AppArmor profile do not matter.
        let file = std::fs::File::create(&pcap).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = ns.cmd(&[
            "tcpdump",
            "-i",
            dev,
            "-n",
            "-U",
            "--immediate-mode",
            "-w",
            "-",
            filter,
        ]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(logf)
            .die_with_parent()
            .spawn()
            .expect("tcpdump (apt install tcpdump)");
        let proc = Proc::adopt(child, Some(log));
        wait_until("tcpdump to listen", Duration::from_secs(10), || {
            proc.output().contains("listening on").then_some(())
        });
        Self { proc, pcap }
    }

    fn datagrams(&self) -> Vec<Udp> {
        parse_pcap(&std::fs::read(&self.pcap).unwrap_or_default())
    }

    /// Waits until at least `n` non-keepalive data messages are in the file (at most
    /// `timeout`), stops tcpdump and returns every datagram captured.
    fn finish(self, n: usize, timeout: Duration) -> Vec<Udp> {
        let deadline = Instant::now() + timeout;
        while self
            .datagrams()
            .iter()
            .filter(|u| u.is_data() && u.len > OVERHEAD)
            .count()
            < n
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let Self { proc, pcap } = self;
        drop(proc);
        parse_pcap(&std::fs::read(pcap).unwrap())
    }
}

/// The UDP payload length of a data message carrying an inner packet of `plain`
/// bytes: WireGuard pads the plaintext to a multiple of 16, but never past the MTU.
fn expected_len(plain: usize, mtu: usize) -> usize {
    OVERHEAD + plain.next_multiple_of(16).min(mtu.max(plain))
}

/// Whether a data message length can come from a WireGuard sender with this MTU:
/// a keepalive (32), a plaintext padded to 16, or one padded up to exactly the MTU.
fn valid_data_len(len: usize, mtu: usize) -> bool {
    len.checked_sub(OVERHEAD)
        .is_some_and(|p| p == mtu || (p < mtu && p % 16 == 0))
}

/// Checks every data message of `caps`, and that each of `expected` (source, length)
/// was seen. Returns a summary: data messages by source and length histogram size.
fn check_padding(
    caps: &[Udp],
    expected: &BTreeSet<(IpAddr, usize)>,
    names: &BTreeMap<IpAddr, &str>,
) -> String {
    let data: Vec<&Udp> = caps.iter().filter(|u| u.is_data()).collect();
    let bad: Vec<String> = data
        .iter()
        .filter(|u| !valid_data_len(u.len, MTU))
        .map(|u| format!("{} -> {}: {} bytes", u.src, u.dst, u.len))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let oversized: Vec<String> = caps
        .iter()
        .filter(|u| u.wire > 1500)
        .map(|u| format!("{} -> {}: {} bytes", u.src, u.dst, u.wire))
        .collect();
    assert!(
        oversized.is_empty(),
        "outer datagrams larger than the underlay MTU (1500): {oversized:?}"
    );
    let seen: BTreeSet<(IpAddr, usize)> = data.iter().map(|u| (u.src, u.len)).collect();
    let missing: Vec<String> = expected
        .difference(&seen)
        .map(|(src, len)| format!("{} from {src}", len))
        .collect();
    assert!(
        bad.is_empty() && missing.is_empty(),
        "data messages not padded as WireGuard pads (32 + min(roundup16(plaintext), \
         {MTU})):\n  invalid lengths seen: {bad:?}\n  expected lengths never seen: \
         {missing:?}"
    );
    let mut summary = String::new();
    for (ip, name) in names {
        let from: Vec<&&Udp> = data.iter().filter(|u| u.src == *ip).collect();
        let lens: BTreeSet<usize> = from.iter().map(|u| u.len).collect();
        let keepalives = from.iter().filter(|u| u.len == OVERHEAD).count();
        summary.push_str(&format!(
            "{name}: {} data messages, {} distinct lengths ({}..={}), {keepalives} keepalives; ",
            from.len(),
            lens.len(),
            lens.first().unwrap_or(&0),
            lens.last().unwrap_or(&0)
        ));
    }
    summary
}

/// The expected (source, length) of a ping's request and reply between x and y
/// (underlay addresses) for ICMP payload sizes `sizes` (inner header `hdr`).
fn expect_pings(
    set: &mut BTreeSet<(IpAddr, usize)>,
    x: IpAddr,
    y: IpAddr,
    hdr: usize,
    sizes: &[usize],
) {
    for s in sizes {
        let l = expected_len(s + hdr, MTU);
        set.insert((x, l));
        set.insert((y, l));
    }
}

/// Routes `b4`/32 and `b6`/128 over `dev` in `ns`, with `extra` route attributes.
fn host_routes(ns: &Netns, dev: &str, b4: &str, b6: &str, extra: &[&str]) {
    for (fam, dst) in [("-4", format!("{b4}/32")), ("-6", format!("{b6}/128"))] {
        let mut args = vec!["ip", fam, "route", "replace", &dst, "dev", dev];
        args.extend_from_slice(extra);
        ns.ok(&args);
    }
}

fn underlay(cidr: &str) -> IpAddr {
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// Underlay addresses of [`meshed_pair`]'s nodes a and b.
const PAIR_CIDRS: [&str; 2] = ["198.51.100.11/24", "198.51.100.12/24"];

/// A cluster of nodes a and b (indices 0 and 1, interfaces `<tag>a0` and `<tag>b0`,
/// at [`PAIR_CIDRS`]) meshed, a reaching b over v4 and v6; with b's tunnel addresses.
fn meshed_pair(tag: &str, deadline: Deadline) -> (Cluster, String, String) {
    let mut c = Cluster::new(tag, "198.51.100.1/24");
    for (name, cidr) in ["a", "b"].into_iter().zip(PAIR_CIDRS) {
        let i = c.add_node(name, cidr, true, &["--interface", &format!("{tag}{name}0")]);
        c.start(i);
    }
    c.nodes[0].wait_peers(1);
    let sb = c.nodes[1].wait_peers(1);
    let b4 = sb.device.tunnel_ip.to_string();
    let b6 = sb.device.tunnel_ip_v6.unwrap().to_string();
    c.nodes[0].ns.assert_pings(&[&b4, &b6], deadline, PING_WAIT);
    (c, b4, b6)
}

#[test]
fn sizes_and_mtu() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let (c, b4, b6) = meshed_pair("sizm", deadline);
    let a = 0;
    let na = &c.nodes[a].ns;
    let link = na.ok(&["ip", "-o", "link", "show", "sizma0"]);
    assert!(link.contains(&format!("mtu {MTU} ")), "{link}");

    // Every size up to the interface MTU, DF set; one more byte is refused locally.
    let (max4, max6) = (MTU - 28, MTU - 48);
    let scratch = c.scratch("sweeps");
    sweeps(
        &[
            (na, &b4, (1..=max4).collect(), "v4 1..=1392"),
            (na, &b6, (1..=max6).collect(), "v6 1..=1372"),
        ],
        &scratch,
        deadline.left(Duration::from_secs(60)),
    );
    assert_too_big(na, &b4, max4 + 1);
    assert_too_big(na, &b6, max6 + 1);

    // A route MTU below the interface MTU.
    host_routes(na, "sizma0", &b4, &b6, &["mtu", "1280"]);
    let route = na.ok(&["ip", "route", "get", &b4]);
    assert!(route.contains("mtu 1280"), "{route}");
    assert_too_big(na, &b4, 1280 - 28 + 1);
    assert_too_big(na, &b6, 1280 - 48 + 1);
    sweeps(
        &[
            (
                na,
                &b4,
                (1..=1280 - 28).collect(),
                "v4 route mtu 1280: 1..=1252",
            ),
            (
                na,
                &b6,
                (1..=1280 - 48).collect(),
                "v6 route mtu 1280: 1..=1232",
            ),
        ],
        &scratch,
        deadline.left(Duration::from_secs(60)),
    );
    host_routes(na, "sizma0", &b4, &b6, &[]);

    // Outer datagrams on A's underlay: assorted sizes, including those whose padding
    // would pass the MTU (inner 1409..=1420 bytes).
    let sizes4 = [
        1, 4, 15, 16, 17, 36, 100, 563, 1000, 1364, 1379, 1380, 1381, 1385, 1391, 1392,
    ];
    let sizes6 = [
        1, 16, 100, 999, 1000, 1344, 1359, 1360, 1361, 1366, 1371, 1372,
    ];
    let cap = Capture::start(na, "eth0", &format!("udp port {WG_PORT}"), &scratch, "a");
    sweeps(
        &[
            (na, &b4, sizes4.to_vec(), "v4 assorted"),
            (na, &b6, sizes6.to_vec(), "v6 assorted"),
        ],
        &scratch,
        deadline.left(Duration::from_secs(30)),
    );
    let caps = cap.finish(
        2 * (sizes4.len() + sizes6.len()),
        deadline.left(Duration::from_secs(10)),
    );
    let (ua, ub) = (underlay(PAIR_CIDRS[0]), underlay(PAIR_CIDRS[1]));
    let mut expected = BTreeSet::new();
    expect_pings(&mut expected, ua, ub, 28, &sizes4);
    expect_pings(&mut expected, ua, ub, 48, &sizes6);
    let names = BTreeMap::from([(ua, "a"), (ub, "b")]);
    let summary = check_padding(&caps, &expected, &names);
    eprintln!("underlay capture: {} datagrams; {summary}", caps.len());
}

#[test]
fn stock_peer_accepts_our_padding() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let (relay_cidr, stock_cidr) = ("198.51.100.2/24", "198.51.100.5/24");
    let mut c = Cluster::new("sizp", "198.51.100.1/24");
    let relay = c.add_relay("relay", relay_cidr, "sizpr0");
    let a = c.add_node("a", "198.51.100.3/24", true, &["--interface", "sizpa0"]);
    c.start(relay);
    c.start(a);
    c.nodes[relay].wait_peers(1);
    c.nodes[a].wait_peers(1);

    let (_config, stock, _wggo) = stock_host(&mut c, stock_cidr, "sizps0", Duration::from_secs(10));
    let scratch = c.scratch("stock");
    let link = stock.ok(&["ip", "-o", "link", "show", "sizps0"]);
    assert!(link.contains(&format!("mtu {MTU} ")), "{link}");

    let sa = wait_until(
        "a to list the stock device",
        Duration::from_secs(30),
        || c.nodes[a].status().filter(|s: &Status| s.peers.len() == 2),
    );
    let peer = sa.peers.iter().find(|p| p.hostname == "stock").unwrap();
    let (s4, s6) = (
        peer.tunnel_ip.to_string(),
        peer.tunnel_ip_v6.unwrap().to_string(),
    );
    let (a4, a6) = (
        sa.device.tunnel_ip.to_string(),
        sa.device.tunnel_ip_v6.unwrap().to_string(),
    );
    let na = &c.nodes[a].ns;
    for (from, to) in [(&stock, &a4), (&stock, &a6), (na, &s4), (na, &s6)] {
        assert!(
            from.ping_until(to, deadline.left(PING_WAIT)),
            "{} cannot ping {to}",
            from.name
        );
    }

    // Between the stock peer and the relay: the relay pads our way, wireguard-go its.
    let cap = Capture::start(
        &stock,
        "eth0",
        &format!("udp port {WG_PORT}"),
        &scratch,
        "stock",
    );
    let sizes: Vec<usize> = (1..=200).collect();
    sweeps(
        &[
            (&stock, &a4, sizes.clone(), "stock -> a v4 1..=200"),
            (&stock, &a6, sizes.clone(), "stock -> a v6 1..=200"),
            (na, &s4, sizes.clone(), "a -> stock v4 1..=200"),
            (na, &s6, sizes.clone(), "a -> stock v6 1..=200"),
        ],
        &scratch,
        deadline.left(Duration::from_secs(90)),
    );
    let caps = cap.finish(8 * sizes.len(), deadline.left(Duration::from_secs(10)));
    let (ur, us) = (underlay(relay_cidr), underlay(stock_cidr));
    let mut expected = BTreeSet::new();
    expect_pings(&mut expected, ur, us, 28, &sizes);
    expect_pings(&mut expected, ur, us, 48, &sizes);
    let names = BTreeMap::from([(ur, "relay (nexodus)"), (us, "stock (wireguard-go)")]);
    let summary = check_padding(&caps, &expected, &names);
    eprintln!(
        "stock underlay capture: {} datagrams; {summary}",
        caps.len()
    );
    let relayed = c.nodes[relay].status().unwrap();
    assert!(relayed.relayed_packets > 0, "the relay forwarded nothing");
    let drops_a = c.nodes[a].status().unwrap().drops;
    eprintln!(
        "relay: {} packets relayed, drops {:?}; a drops {drops_a:?}",
        relayed.relayed_packets, relayed.drops
    );
}

fn replay_drops(s: &Status) -> u64 {
    s.drops.get("replay").copied().unwrap_or(0)
}

#[test]
fn reorder_and_duplicate() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let (c, b4, b6) = meshed_pair("rdup", deadline);
    let (a, b) = (0, 1);
    let (na, nb) = (&c.nodes[a].ns, &c.nodes[b].ns);
    let before = [c.nodes[a].status().unwrap(), c.nodes[b].status().unwrap()];

    // The kernel may lack sch_netem, so the impairment is done in userspace: the hub
    // bridge drops WireGuard datagrams between a (port p2) and b (port p3) and a
    // thread forwards them instead, delayed 2..8 ms, a quarter at once (overtaking
    // the delayed ones), a tenth twice. GSO stays off on the nodes' underlay so every
    // frame is one datagram.
    for ns in [na, nb] {
        ns.ok(&["ip", "link", "set", "eth0", "gso_max_segs", "1"]);
    }
    let impair = Impair::start(&c.lan.hub.name, ["p2", "p3"]);
    c.lan.hub.ok_with_stdin(
        &["nft", "-f", "-"],
        &format!(
            "table bridge nxrdup {{\n\tchain forward {{\n\t\ttype filter hook forward \
             priority filter; policy accept;\n\t\tudp sport {WG_PORT} udp dport {WG_PORT} \
             drop\n\t}}\n}}\n"
        ),
    );

    // TCP over the tunnel.
    let scratch = c.scratch("rdup");
    let _server = Proc::spawn(
        nb.cmd(&["iperf3", "-s", "-1", "-B", &b4, "-p", "5299"]),
        scratch.join("iperf3-server.log"),
    );
    wait_until("iperf3 to listen", Duration::from_secs(10), || {
        nb.ok(&["ss", "-Htln", "sport", "= :5299"])
            .contains("5299")
            .then_some(())
    });
    let client = Proc::spawn(
        na.cmd(&[
            "iperf3",
            "-c",
            &b4,
            "-p",
            "5299",
            "-t",
            "5",
            "-J",
            "--connect-timeout",
            "5000",
        ]),
        scratch.join("iperf3-client.json"),
    );
    let (ok, out) = client.finish(deadline.left(Duration::from_secs(40)));
    assert!(ok, "iperf3 failed: {out}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let received = json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let retrans = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    assert!(received > 0, "iperf3 moved no bytes: {out}");

    // Fixed counts of pings: every one answered once, never twice.
    let pings: Vec<Proc> = [&b4, &b6]
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            Proc::spawn(
                na.cmd(&["ping", "-n", "-c", "200", "-i", "0.01", "-w", "40", addr]),
                scratch.join(format!("ping{i}.out")),
            )
        })
        .collect();
    let mut ping_summary = Vec::new();
    for (p, addr) in pings.into_iter().zip([&b4, &b6]) {
        let (_, out) = p.finish(deadline.left(Duration::from_secs(45)));
        let stats = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary: {out}"))
            .to_string();
        assert!(
            !out.contains("DUP!") && !stats.contains("duplicates"),
            "a duplicate reached TUN (ping {addr}): {stats}"
        );
        let got: usize = stats
            .split(", ")
            .find_map(|f| f.strip_suffix(" received")?.parse().ok())
            .unwrap_or(0);
        assert!(got >= 190, "ping {addr}: {stats}");
        ping_summary.push(stats);
    }

    let stats = impair.stop();
    c.lan
        .hub
        .ok(&["nft", "delete", "table", "bridge", "nxrdup"]);
    assert!(
        stats.frames[0] > 0 && stats.frames[1] > 0,
        "the impairer saw no WireGuard traffic: {stats:?}"
    );
    assert!(
        stats.duplicated > 0 && stats.overtaken > 0,
        "nothing was duplicated or reordered: {stats:?}"
    );
    let after = [c.nodes[a].status().unwrap(), c.nodes[b].status().unwrap()];
    for (i, name) in ["a", "b"].iter().enumerate() {
        assert!(
            replay_drops(&after[i]) > replay_drops(&before[i]),
            "{name}: duplicates were not rejected by the replay window: drops {:?}",
            after[i].drops
        );
    }
    eprintln!(
        "impairer: {stats:?}; iperf3: {received} bytes, {:.1} Mbit/s, {retrans} retransmits; pings: {ping_summary:?}; \
         replay drops a {} -> {}, b {} -> {}; drops a {:?}, b {:?}",
        bps / 1e6,
        replay_drops(&before[0]),
        replay_drops(&after[0]),
        replay_drops(&before[1]),
        replay_drops(&after[1]),
        after[0].drops,
        after[1].drops
    );
}

/// What [`Impair`] did.
#[derive(Debug, Default)]
struct ImpairStats {
    /// WireGuard frames taken from each port.
    frames: [u64; 2],
    /// Extra copies sent.
    duplicated: u64,
    /// Frames sent after a frame that arrived later (in the same direction).
    overtaken: u64,
    send_errors: u64,
}

/// A userspace `netem` for WireGuard datagrams between two bridge ports: a thread in
/// the bridge's namespace reads the ports' ingress with AF_PACKET sockets and sends
/// each WireGuard frame out of the other port, delayed, reordered and duplicated.
/// The bridge itself must drop those frames (see the test). Stops on drop.
struct Impair {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<ImpairStats>>,
}

impl Impair {
    fn start(ns: &str, ports: [&str; 2]) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let ports = ports.map(str::to_string);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let socks = match impair_sockets(&ns, &ports) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return ImpairStats::default();
                }
            };
            let _ = tx.send(Ok(()));
            impair_loop(&socks, &flag)
        });
        let ready = rx.recv_timeout(Duration::from_secs(10));
        let me = Self {
            stop,
            thread: Some(thread),
        };
        match ready {
            Ok(Ok(())) => me,
            Ok(Err(e)) => panic!("impairer: {e}"),
            Err(e) => panic!("impairer did not start: {e}"),
        }
    }

    fn stop(mut self) -> ImpairStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Impair {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves this thread into `ns` and opens one AF_PACKET socket bound to each port.
fn impair_sockets(ns: &str, ports: &[String; 2]) -> Result<[std::os::fd::OwnedFd; 2], String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("{ns}: {e}"))?;
    // SAFETY: setns on a valid fd; it moves only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    let open = |port: &String| -> Result<OwnedFd, String> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket call; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(port.as_str()).unwrap();
        // SAFETY: name is a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(format!("no interface {port}"));
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: sll is a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!("bind {port}: {}", std::io::Error::last_os_error()));
        }
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with an int option of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Ok(fd)
    };
    Ok([open(&ports[0])?, open(&ports[1])?])
}

/// An Ethernet frame carrying a WireGuard datagram (UDP 51820 to 51820).
fn is_wg_frame(f: &[u8]) -> bool {
    let udp = match f.get(12..14) {
        Some([0x08, 0x00]) if f.get(23) == Some(&17) => {
            let ihl = usize::from(f.get(14).map_or(0, |b| b & 0x0f)) * 4;
            f.get(14 + ihl..)
        }
        Some([0x86, 0xdd]) if f.get(20) == Some(&17) => f.get(54..),
        _ => None,
    };
    let port = 51820u16.to_be_bytes();
    udp.is_some_and(|u| u.get(..2) == Some(&port[..]) && u.get(2..4) == Some(&port[..]))
}

/// Fills in the UDP checksum of a WireGuard frame from [`is_wg_frame`]: a frame read
/// from a veth may carry only a partial (offloaded) checksum.
fn fix_udp_checksum(f: &mut [u8]) {
    let (pseudo, udp_at): (Vec<u8>, usize) = if f[12..14] == [0x08, 0x00] {
        let ihl = usize::from(f[14] & 0x0f) * 4;
        (f[26..34].to_vec(), 14 + ihl)
    } else {
        (f[22..54].to_vec(), 54)
    };
    let udp_len = usize::from(u16::from_be_bytes([f[udp_at + 4], f[udp_at + 5]]));
    let Some(udp) = f.get_mut(udp_at..udp_at + udp_len) else {
        return;
    };
    udp[6] = 0;
    udp[7] = 0;
    let mut sum: u64 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&pseudo);
    add(&[0, 17]);
    add(&(udp_len as u16).to_be_bytes());
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    let c = if c == 0 { 0xffff } else { c };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
}

struct Pending {
    due: Instant,
    seq: u64,
    out: usize,
    arrival: u64,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

fn impair_loop(
    socks: &[std::os::fd::OwnedFd; 2],
    stop: &std::sync::atomic::AtomicBool,
) -> ImpairStats {
    use std::cmp::Reverse;
    use std::os::fd::AsRawFd;
    let mut stats = ImpairStats::default();
    let mut heap: std::collections::BinaryHeap<Reverse<Pending>> = Default::default();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
        );
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut seq = 0u64;
    let mut arrivals = [0u64; 2];
    let mut last_sent = [0u64; 2];
    let mut buf = vec![0u8; 65_536];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(p)| p.due <= now) {
            let Reverse(p) = heap.pop().unwrap();
            // SAFETY: sending a buffer we own on a bound packet socket.
            let n = unsafe {
                libc::send(
                    socks[p.out].as_raw_fd(),
                    p.frame.as_ptr().cast(),
                    p.frame.len(),
                    0,
                )
            };
            if n < 0 {
                stats.send_errors += 1;
            }
            if p.arrival < last_sent[p.out] {
                stats.overtaken += 1;
            }
            last_sent[p.out] = last_sent[p.out].max(p.arrival);
        }
        let wait = heap.peek().map_or(20, |Reverse(p)| {
            p.due
                .saturating_duration_since(now)
                .as_micros()
                .div_ceil(1000)
                .min(20) as i32
        });
        let mut fds = socks.each_ref().map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: fds is a valid array of two pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            loop {
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buf and from are valid for the sizes given.
                let n = unsafe {
                    libc::recvfrom(
                        fd.fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&raw mut from).cast(),
                        &mut flen,
                    )
                };
                let Ok(n) = usize::try_from(n) else { break };
                let frame = &mut buf[..n];
                if from.sll_pkttype == libc::PACKET_OUTGOING || !is_wg_frame(frame) {
                    continue;
                }
                fix_udp_checksum(frame);
                let frame = &*frame;
                stats.frames[i] += 1;
                let out = 1 - i;
                arrivals[out] += 1;
                let copies = if rand(100) < 10 { 2 } else { 1 };
                stats.duplicated += copies - 1;
                for _ in 0..copies {
                    let delay = if rand(100) < 25 {
                        Duration::ZERO
                    } else {
                        Duration::from_micros(2000 + rand(6001))
                    };
                    seq += 1;
                    heap.push(Reverse(Pending {
                        due: Instant::now() + delay,
                        seq,
                        out,
                        arrival: arrivals[out],
                        frame: frame.to_vec(),
                    }));
                }
            }
        }
    }
    stats
}
