//! The node's side of the access policy (DESIGN §7): which inbound table its data
//! plane enforces. Sans-IO: fed the organization's policy as the coordinator sends
//! it and the devices the node knows; says when the data plane needs a new table.
//!
//! The coordinator validated the file before storing it; a node that cannot parse
//! it anyway (an older build than the coordinator) keeps the table it had and says
//! so, rather than opening everything.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::policy::{DeviceInfo, InboundTable, Policy, compile};
use crate::wire::control::{Device, PolicyState};

/// The policy in force on this node and the table compiled from it.
#[derive(Debug, Default)]
pub struct Access {
    policy: Option<Arc<Policy>>,
    /// The revision of the policy in force (0: none yet).
    revision: i64,
    table: Option<InboundTable>,
    /// The table the data plane must be given (`Some(None)`: no policy any more).
    pending: Option<Option<InboundTable>>,
    /// This node relays: it enforces the tables of devices that cannot
    /// (stock WireGuard devices, `unmanaged`).
    relay: bool,
    /// Those tables by device id, and the changes the data plane must be given.
    relay_tables: BTreeMap<i64, InboundTable>,
    relay_pending: VecDeque<(i64, Option<InboundTable>)>,
}

/// Why a policy from the coordinator was not taken.
#[derive(Debug, thiserror::Error)]
#[error("policy revision {revision} from the coordinator does not parse here: {source}")]
pub struct AccessError {
    pub revision: i64,
    #[source]
    pub source: crate::policy::PolicyError,
}

impl Access {
    /// The organization's policy as the coordinator sent it (`None`: it has none).
    /// Call [`Access::recompile`] after it.
    pub fn set_policy(&mut self, state: Option<&PolicyState>) -> Result<(), AccessError> {
        let (revision, text) = match state {
            Some(PolicyState {
                revision,
                text: Some(text),
            }) => (*revision, text),
            _ => {
                self.policy = None;
                self.revision = state.map_or(0, |s| s.revision);
                return Ok(());
            }
        };
        let policy = Policy::parse(text).map_err(|source| AccessError { revision, source })?;
        self.policy = Some(Arc::new(policy));
        self.revision = revision;
        Ok(())
    }

    /// Compiles this node's inbound table from the policy and the organization's
    /// devices (`me` among them or not); the data plane gets it only if it changed.
    pub fn recompile<'a>(&mut self, me: &Device, devices: impl IntoIterator<Item = &'a Device>) {
        let table = self.policy.as_ref().map(|policy| {
            let mut infos: Vec<DeviceInfo> = devices
                .into_iter()
                .filter(|d| d.id != me.id)
                .map(info)
                .collect();
            infos.push(info(me));
            compile(policy, &infos, &info(me))
        });
        if table != self.table {
            self.table = table.clone();
            self.pending = Some(table);
        }
    }

    /// Whether this node relays (and so enforces for unmanaged devices); call
    /// [`Access::recompile_relay`] after it.
    pub fn set_relay(&mut self, relay: bool) {
        self.relay = relay;
    }

    /// On a relay, compiles the inbound table of each unmanaged device among
    /// `devices` (which must include every device the policy may name); the data
    /// plane is given the tables that changed, and `None` for devices that left,
    /// became managed, or when the policy or the relay role went.
    pub fn recompile_relay<'a>(
        &mut self,
        me: &Device,
        devices: impl IntoIterator<Item = &'a Device>,
    ) {
        let mut tables = BTreeMap::new();
        if let (true, Some(policy)) = (self.relay, self.policy.as_ref()) {
            let all: Vec<&Device> = devices.into_iter().filter(|d| d.id != me.id).collect();
            if all.iter().any(|d| d.unmanaged) {
                let mut infos: Vec<DeviceInfo> = all.iter().map(|d| info(d)).collect();
                infos.push(info(me));
                for d in all.iter().filter(|d| d.unmanaged) {
                    tables.insert(d.id, compile(policy, &infos, &info(d)));
                }
            }
        }
        for id in self.relay_tables.keys() {
            if !tables.contains_key(id) {
                self.relay_pending.push_back((*id, None));
            }
        }
        for (id, table) in &tables {
            if self.relay_tables.get(id) != Some(table) {
                self.relay_pending.push_back((*id, Some(table.clone())));
            }
        }
        self.relay_tables = tables;
    }

    /// The next unmanaged device whose table the data plane must enforce (or stop
    /// enforcing: `None`) on this relay.
    pub fn poll_relay_table(&mut self) -> Option<(i64, Option<InboundTable>)> {
        self.relay_pending.pop_front()
    }

    /// The unmanaged devices this relay enforces the policy for.
    pub fn relay_enforced(&self) -> usize {
        self.relay_tables.len()
    }

    /// The table the data plane must enforce now, once per change.
    pub fn poll_table(&mut self) -> Option<Option<InboundTable>> {
        self.pending.take()
    }

    /// Whether a policy is in force, and its revision.
    pub fn in_force(&self) -> Option<i64> {
        self.policy.as_ref().map(|_| self.revision)
    }

    /// Inbound rules that concern this node (0 without a policy).
    pub fn rules(&self) -> usize {
        self.table.as_ref().map_or(0, InboundTable::len)
    }
}

fn info(d: &Device) -> DeviceInfo {
    DeviceInfo {
        hostname: d.hostname.clone(),
        v4: d.tunnel_ip,
        v6: d.tunnel_ip_v6,
        routes: d.advertise_cidrs.clone(),
        // Only an exit in use carries internet traffic: one approved as such.
        exit: d.exit_node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mesh::tests::device;

    const WEB_FROM_OPS: &str =
        "[[allow]]\nfrom = [\"ops*\"]\nto = [\"web*\"]\nproto = \"tcp\"\nports = [\"443\"]\n";

    fn state(revision: i64, text: Option<&str>) -> PolicyState {
        PolicyState {
            revision,
            text: text.map(str::to_string),
        }
    }

    #[test]
    fn a_table_goes_out_once_per_change() {
        let mut me = device(1, true);
        me.hostname = "web1".into();
        let mut ops = device(2, true);
        ops.hostname = "ops1".into();
        let mut a = Access::default();
        a.recompile(&me, [&ops]);
        assert_eq!(a.poll_table(), None, "no policy, nothing to say");

        a.set_policy(Some(&state(1, Some(WEB_FROM_OPS)))).unwrap();
        a.recompile(&me, [&me, &ops]);
        let table = a.poll_table().expect("a table").expect("a policy");
        assert!(table.allows(ops.tunnel_ip.into(), me.tunnel_ip.into(), 6, Some(443)));
        assert!(!table.allows(ops.tunnel_ip.into(), me.tunnel_ip.into(), 6, Some(22)));
        assert_eq!(a.in_force(), Some(1));
        // Same devices, same policy: nothing new.
        a.recompile(&me, [&ops]);
        assert_eq!(a.poll_table(), None);

        // A device joins that the rule covers: a new table.
        let mut ops2 = device(3, true);
        ops2.hostname = "ops2".into();
        a.recompile(&me, [&ops, &ops2]);
        let table = a.poll_table().expect("a table").expect("a policy");
        assert!(table.allows(ops2.tunnel_ip.into(), me.tunnel_ip.into(), 6, Some(443)));

        // Cleared: the data plane is told to stop filtering.
        a.set_policy(Some(&state(2, None))).unwrap();
        a.recompile(&me, [&ops, &ops2]);
        assert_eq!(a.poll_table(), Some(None));
        assert_eq!(a.in_force(), None);
    }

    #[test]
    fn a_policy_that_does_not_parse_keeps_the_old_one() {
        let me = device(1, true);
        let mut a = Access::default();
        a.set_policy(Some(&state(1, Some(WEB_FROM_OPS)))).unwrap();
        a.recompile(&me, []);
        assert!(a.poll_table().is_some());
        let err = a
            .set_policy(Some(&state(
                2,
                Some("[[allow]]\nfrom = [\"group:x\"]\nto = [\"*\"]\n"),
            )))
            .unwrap_err();
        assert_eq!(err.revision, 2);
        assert_eq!(a.in_force(), Some(1));
        a.recompile(&me, []);
        assert_eq!(a.poll_table(), None);
    }

    #[test]
    fn a_relay_compiles_the_tables_of_unmanaged_devices() {
        let me = device(1, true);
        let mut ops = device(2, true);
        ops.hostname = "ops1".into();
        let mut phone = device(3, true);
        phone.hostname = "web-phone".into();
        phone.unmanaged = true;
        let mut a = Access::default();
        a.set_policy(Some(&state(1, Some(WEB_FROM_OPS)))).unwrap();
        // Not a relay: nothing to enforce for others.
        a.recompile_relay(&me, [&ops, &phone]);
        assert_eq!(a.poll_relay_table(), None);

        a.set_relay(true);
        a.recompile_relay(&me, [&ops, &phone]);
        let (id, table) = a.poll_relay_table().expect("the phone's table");
        let table = table.expect("a policy");
        assert_eq!(id, phone.id);
        assert!(table.allows(ops.tunnel_ip.into(), phone.tunnel_ip.into(), 6, Some(443)));
        assert!(!table.allows(ops.tunnel_ip.into(), phone.tunnel_ip.into(), 6, Some(22)));
        assert_eq!(
            a.poll_relay_table(),
            None,
            "managed devices enforce themselves"
        );
        a.recompile_relay(&me, [&ops, &phone]);
        assert_eq!(a.poll_relay_table(), None, "unchanged: nothing new");
        assert_eq!(a.relay_enforced(), 1);

        // The policy cleared: the relay stops filtering for the phone.
        a.set_policy(Some(&state(2, None))).unwrap();
        a.recompile_relay(&me, [&ops, &phone]);
        assert_eq!(a.poll_relay_table(), Some((phone.id, None)));
        assert_eq!(a.relay_enforced(), 0);
    }
}
