//! A stock WireGuard peer: Debian's `wireguard-go` + `wg`, configured by hand from the
//! wg-quick file `nexodus devices add` prints, as wg-quick itself would.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::cluster::Cluster;
use super::netns::Netns;
use super::wait_until;
use super::{DieWithParent, proc};

/// Splits a wg-quick config into its Address values and a `wg setconf` config
/// (wg-quick-only keys removed).
pub fn split_wg_quick(config: &str) -> (Vec<String>, String) {
    const QUICK_ONLY: [&str; 8] = [
        "DNS",
        "MTU",
        "Table",
        "PreUp",
        "PostUp",
        "PreDown",
        "PostDown",
        "SaveConfig",
    ];
    let mut addresses = Vec::new();
    let mut conf = String::new();
    for line in config.lines() {
        let t = line.trim();
        let key = t.split('=').next().unwrap_or("").trim();
        if key == "Address" {
            let v = t.split_once('=').map_or("", |(_, v)| v);
            addresses.extend(v.split(',').map(|a| a.trim().to_string()));
        } else if !QUICK_ONLY.contains(&key) {
            conf.push_str(line);
            conf.push('\n');
        }
    }
    (addresses, conf)
}

/// wireguard-go on interface `iface` in a namespace, configured from a wg-quick file;
/// asked to stop (SIGTERM, which removes its UAPI socket) and reaped on drop.
pub struct StockPeer {
    pub iface: String,
    /// The Address values of the wg-quick file.
    pub addresses: Vec<String>,
    child: Option<Child>,
}

impl StockPeer {
    /// Starts wireguard-go (output to `log`), waits at most `timeout` for `iface`,
    /// applies the config (written to `dir`/wg.conf), the addresses, and routes to the
    /// mesh prefixes (100.64.0.0/10, 200::/64) through it.
    pub fn start(
        ns: &Netns,
        iface: &str,
        config: &str,
        dir: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Self {
        let (addresses, conf) = split_wg_quick(config);
        let conf_path = dir.join("wg.conf");
        std::fs::write(&conf_path, conf).expect("write wg.conf");
        let log = std::fs::File::create(log).expect("wireguard-go log");
        let child = ns
            .cmd(&["wireguard-go", "-f", iface])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .die_with_parent()
            .spawn()
            .expect("wireguard-go (apt install wireguard-go)");
        let peer = Self {
            iface: iface.into(),
            addresses,
            child: Some(child),
        };
        wait_until(&format!("wireguard-go to create {iface}"), timeout, || {
            ns.try_run(&["ip", "link", "show", iface]).then_some(())
        });
        ns.ok(&[
            "wg",
            "setconf",
            iface,
            conf_path.to_str().expect("utf-8 path"),
        ]);
        for addr in &peer.addresses {
            if addr.contains(':') {
                ns.ok(&["ip", "-6", "addr", "add", addr, "dev", iface, "nodad"]);
            } else {
                ns.ok(&["ip", "addr", "add", addr, "dev", iface]);
            }
        }
        ns.ok(&["ip", "link", "set", iface, "up"]);
        ns.ok(&["ip", "route", "add", "100.64.0.0/10", "dev", iface]);
        ns.ok(&["ip", "-6", "route", "add", "200::/64", "dev", iface]);
        peer
    }
}

impl Drop for StockPeer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            proc::signal(&c, libc::SIGTERM);
            let _ = proc::exit_within(&mut c, Duration::from_secs(5));
            proc::kill(c);
        }
    }
}

/// A stock device "stock" added to `c`'s coordinator (`devices add --generate-key`),
/// run by wireguard-go on interface `iface` in a host "stock" at `cidr` on the bridge
/// (waiting at most `timeout` for the interface; log in the cluster's logs). Returns
/// the wg-quick config, the host and the peer (declare them in that order, so the
/// peer stops before its namespace goes); the config has a v4 and a v6 address.
pub fn stock_host(
    c: &mut Cluster,
    cidr: &str,
    iface: &str,
    timeout: Duration,
) -> (String, Netns, StockPeer) {
    let config = c
        .coord
        .admin(&["devices", "add", "--hostname", "stock", "--generate-key"]);
    let ns = c.lan.host("stock", cidr, true);
    let peer = StockPeer::start(
        &ns,
        iface,
        &config,
        &c.scratch("stock"),
        &c.scratch("logs").join("wireguard-go.log"),
        timeout,
    );
    assert_eq!(peer.addresses.len(), 2, "{config}");
    (config, ns, peer)
}
