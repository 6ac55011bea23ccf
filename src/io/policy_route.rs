//! `--use-exit-node`: policy routing in the style of wg-quick (DESIGN §8).
//!
//! Our WireGuard UDP socket carries the fwmark [`FWMARK`], so every peer endpoint
//! and STUN server stays on the underlay (main table); so do the coordinators and
//! the mesh (or, with `--exit-node-allow-lan`, everything the main table routes more
//! specifically than a default route). Everything else is looked up in our table
//! [`TABLE`]: a default route into the tunnel while the exit is usable for that
//! family, and always an `unreachable` default behind it, so with the exit absent,
//! offline or lacking a family the traffic fails closed instead of leaving through
//! the host's uplink. The rules carry priorities of their own ([`PRIORITIES`]), so
//! [`cleanup`] finds what a killed run left without remembering it.

use std::net::IpAddr;

use ipnet::IpNet;

use super::route::{RouteError, ip};

/// The mark on our UDP socket's packets, and the number of our routing table.
pub const FWMARK: u32 = 0x6e78;
/// Our routing table.
pub const TABLE: u32 = 0x6e78;
/// The first of our rules' priorities: coordinators, then marked packets, the mesh
/// (or LAN), our table.
pub const MAIN: u32 = 5270;
/// The same rules without the mesh, four priorities lower, hold while the main
/// ones are replaced: a (re)install never opens a window in which traffic could
/// leave unprotected, and the coordinators and peers stay reachable meanwhile.
pub const HOLD: u32 = 5265;
/// Every rule priority we own.
pub const PRIORITIES: [u32; 8] = [
    HOLD,
    HOLD + 1,
    HOLD + 2,
    HOLD + 3,
    MAIN,
    MAIN + 1,
    MAIN + 2,
    MAIN + 3,
];
/// The metric of the `unreachable` default behind the tunnel's default route.
const UNREACHABLE_METRIC: &str = "4278198272";

/// Which family an `ip` command speaks.
fn fam(v6: bool) -> &'static str {
    if v6 { "-6" } else { "-4" }
}

/// What [`install`] sets up, as `ip` argument lists (pure, for tests): the
/// unreachable default in our table and the rules, per family in `families`.
pub fn install_commands(
    coordinators: &[IpAddr],
    mesh: &[IpNet],
    allow_lan: bool,
    families: &[bool],
) -> Vec<Vec<String>> {
    commands_at(MAIN, coordinators, mesh, allow_lan, families)
}

/// [`install_commands`] with the rules at priorities `base`..`base + 3`.
fn commands_at(
    base: u32,
    coordinators: &[IpAddr],
    mesh: &[IpNet],
    allow_lan: bool,
    families: &[bool],
) -> Vec<Vec<String>> {
    let table = TABLE.to_string();
    let prio = |i: u32| (base + i).to_string();
    let mut out = Vec::new();
    for &v6 in families {
        let f = fam(v6).to_string();
        let args = |rest: &[&str]| -> Vec<String> {
            std::iter::once(f.clone())
                .chain(rest.iter().map(|s| (*s).to_string()))
                .collect()
        };
        out.push(args(&[
            "route",
            "replace",
            "unreachable",
            "default",
            "table",
            &table,
            "metric",
            UNREACHABLE_METRIC,
        ]));
        for c in coordinators.iter().filter(|c| c.is_ipv6() == v6) {
            out.push(args(&[
                "rule",
                "add",
                "to",
                &IpNet::from(*c).to_string(),
                "lookup",
                "main",
                "priority",
                &prio(0),
            ]));
        }
        out.push(args(&[
            "rule",
            "add",
            "fwmark",
            &format!("{FWMARK:#x}"),
            "lookup",
            "main",
            "priority",
            &prio(1),
        ]));
        if allow_lan {
            out.push(args(&[
                "rule",
                "add",
                "lookup",
                "main",
                "suppress_prefixlength",
                "0",
                "priority",
                &prio(2),
            ]));
        } else {
            for m in mesh.iter().filter(|m| m.addr().is_ipv6() == v6) {
                out.push(args(&[
                    "rule",
                    "add",
                    "to",
                    &m.to_string(),
                    "lookup",
                    "main",
                    "priority",
                    &prio(2),
                ]));
            }
        }
        out.push(args(&[
            "rule",
            "add",
            "lookup",
            &table,
            "priority",
            &prio(3),
        ]));
    }
    out
}

fn ip_ok(args: &[&str]) -> bool {
    let args: Vec<String> = args.iter().map(|s| (*s).to_string()).collect();
    ip(&args).is_ok()
}

/// Removes every rule of `priorities` for the family; how many.
fn remove_rules(v6: bool, priorities: &[u32]) -> usize {
    let mut removed = 0;
    for p in priorities {
        let p = p.to_string();
        // Several rules may share a priority; each `del` takes one.
        for _ in 0..256 {
            if !ip_ok(&[fam(v6), "rule", "del", "priority", &p]) {
                break;
            }
            removed += 1;
        }
    }
    removed
}

/// Removes every rule with one of our priorities and empties our table, for both
/// families; returns how many things it removed (a killed run's leftovers).
pub fn cleanup() -> usize {
    let table = TABLE.to_string();
    let mut removed = 0;
    for v6 in [false, true] {
        removed += remove_rules(v6, &PRIORITIES);
        for _ in 0..16 {
            if !ip_ok(&[fam(v6), "route", "del", "default", "table", &table]) {
                break;
            }
            removed += 1;
        }
        let _ = ip_ok(&[fam(v6), "route", "flush", "table", &table]);
    }
    removed
}

/// Installs the rules and the unreachable defaults (see [`install_commands`]),
/// replacing ours from before (this run's, or a killed run's) without a gap: the
/// [`HOLD`] rules stand in meanwhile. On failure
/// everything is removed (the host is back to its own routing) and the error
/// returned, so `join` stops.
pub fn install(
    coordinators: &[IpAddr],
    mesh: &[IpNet],
    allow_lan: bool,
    families: &[bool],
) -> Result<(), RouteError> {
    let result = (|| {
        let hold: Vec<u32> = PRIORITIES[..4].to_vec();
        for &v6 in families {
            remove_rules(v6, &hold);
        }
        for args in commands_at(HOLD, coordinators, &[], false, families) {
            ip(&args)?;
        }
        for &v6 in families {
            remove_rules(v6, &PRIORITIES[4..]);
        }
        for args in install_commands(coordinators, mesh, allow_lan, families) {
            ip(&args)?;
        }
        for &v6 in families {
            remove_rules(v6, &hold);
        }
        Ok(())
    })();
    if result.is_err() {
        cleanup();
    }
    result
}

/// Routes `net` into the tunnel `dev`, in our table: an exit's `/0`, or (beside
/// its route in the main table) a peer's advertised prefix, which must win over
/// our table's defaults by longest prefix, the exit's or the unreachable one.
pub fn add_route(dev: &str, net: IpNet) -> Result<(), RouteError> {
    let table = TABLE.to_string();
    let net = net.to_string();
    ip(&table_args("replace", dev, &net, &table))
}

/// Takes a route of [`add_route`] out of our table (the unreachable default
/// stays); one already gone is not an error.
pub fn remove_route(dev: &str, net: IpNet) -> Result<(), RouteError> {
    let table = TABLE.to_string();
    let net = net.to_string();
    match ip(&table_args("del", dev, &net, &table)) {
        Err(RouteError::Failed { stderr, .. }) if stderr.contains("No such process") => Ok(()),
        other => other,
    }
}

fn table_args(verb: &str, dev: &str, net: &str, table: &str) -> Vec<String> {
    let v6 = net.contains(':');
    [fam(v6), "route", verb, net, "dev", dev, "table", table]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(c: &[Vec<String>]) -> Vec<String> {
        c.iter().map(|a| a.join(" ")).collect()
    }

    #[test]
    fn both_families_fail_closed_and_keep_the_underlay() {
        let c = joined(&install_commands(
            &["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            &[
                "100.64.0.0/10".parse().unwrap(),
                "200::/64".parse().unwrap(),
            ],
            false,
            &[false, true],
        ));
        let want = [
            "-4 route replace unreachable default table 28280 metric 4278198272",
            "-4 rule add to 192.0.2.1/32 lookup main priority 5270",
            "-4 rule add fwmark 0x6e78 lookup main priority 5271",
            "-4 rule add to 100.64.0.0/10 lookup main priority 5272",
            "-4 rule add lookup 28280 priority 5273",
            "-6 route replace unreachable default table 28280 metric 4278198272",
            "-6 rule add to 2001:db8::1/128 lookup main priority 5270",
            "-6 rule add fwmark 0x6e78 lookup main priority 5271",
            "-6 rule add to 200::/64 lookup main priority 5272",
            "-6 rule add lookup 28280 priority 5273",
        ];
        assert_eq!(c, want);
    }

    #[test]
    fn the_hold_rules_keep_the_underlay_below_the_main_ones() {
        let c = joined(&commands_at(
            HOLD,
            &["192.0.2.1".parse().unwrap()],
            &[],
            false,
            &[false],
        ));
        assert_eq!(
            c,
            [
                "-4 route replace unreachable default table 28280 metric 4278198272",
                "-4 rule add to 192.0.2.1/32 lookup main priority 5265",
                "-4 rule add fwmark 0x6e78 lookup main priority 5266",
                "-4 rule add lookup 28280 priority 5268",
            ]
        );
        assert!(PRIORITIES.iter().all(|p| (5265..=5273).contains(p)));
    }

    #[test]
    fn routes_in_our_table_name_their_family() {
        assert_eq!(
            table_args("replace", "nx0", "0.0.0.0/0", "28280").join(" "),
            "-4 route replace 0.0.0.0/0 dev nx0 table 28280"
        );
        assert_eq!(
            table_args("del", "nx0", "2001:db8:100::/64", "28280").join(" "),
            "-6 route del 2001:db8:100::/64 dev nx0 table 28280"
        );
    }

    #[test]
    fn allow_lan_keeps_every_specific_main_route() {
        let c = joined(&install_commands(&[], &[], true, &[false]));
        assert!(
            c.contains(&"-4 rule add lookup main suppress_prefixlength 0 priority 5272".into())
        );
        assert!(c.iter().all(|a| !a.starts_with("-6")), "{c:?}");
        // The unreachable default comes before the rule that sends anything there.
        assert!(c[0].contains("unreachable"));
        assert!(c.last().unwrap().contains("lookup 28280"));
    }
}
