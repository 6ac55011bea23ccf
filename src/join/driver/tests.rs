use std::sync::{Arc, Mutex};

use super::*;
use crate::join::apply::RouteChange;
use crate::node::mesh::Action;
use crate::node::mesh::tests::{device, local};

/// Records the data-path commands.
#[derive(Default)]
struct Peers(Mutex<Vec<String>>);

impl CommandSink for Peers {
    fn send(&self, cmd: Command) {
        let name = match cmd {
            Command::Upsert(id, _) => format!("upsert {id}"),
            Command::Remove(id) => format!("remove {id}"),
            _ => "other".into(),
        };
        self.0.lock().unwrap().push(name);
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

/// Route changes produced by successive events reach the route applier, and are
/// applied, in the order the core produced them, even when applying is slow.
#[test]
fn route_actions_are_applied_in_production_order() {
    let applied = Arc::new(Mutex::new(Vec::new()));
    let recorder = applied.clone();
    let routes = RouteApplier::spawn(move |change| {
        // A slow first change must not let a later one overtake it.
        if recorder.lock().unwrap().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        recorder.lock().unwrap().push(change);
    })
    .unwrap();
    let peers = Peers::default();
    let coordinator = "198.51.100.1:4443".parse().unwrap();
    let new_agent = || Agent::new(device(1, true), local(1, false), false, coordinator);
    let now = Instant::now();
    // Peer 2 appears, goes, and comes back with peer 3: add, remove, add again.
    let events: [&dyn Fn(&mut Agent); 3] = [
        &|a| a.handle_snapshot(&[device(2, false)], None, coordinator, now),
        &|a| a.handle_delta(&[], &[2], now),
        &|a| a.handle_delta(&[device(2, false), device(3, false)], &[], now),
    ];
    // A twin core fed the same events shows what was produced, in order.
    let mut twin = new_agent();
    let mut produced = Vec::new();
    let mut agent = new_agent();
    for event in events {
        event(&mut twin);
        produced.extend(
            std::iter::from_fn(|| twin.poll_action()).filter_map(|a| match a {
                Action::AddRoute(n) => Some(RouteChange::Add(n)),
                Action::RemoveRoute(n) => Some(RouteChange::Remove(n)),
                _ => None,
            }),
        );
        event(&mut agent);
        apply_actions(&mut agent, 20, &peers, Some(&routes));
    }
    drop(routes);
    assert_eq!(
        produced,
        [
            RouteChange::Add(net("100.64.0.2/32")),
            RouteChange::Remove(net("100.64.0.2/32")),
            RouteChange::Add(net("100.64.0.2/32")),
            RouteChange::Add(net("100.64.0.3/32")),
        ]
    );
    assert_eq!(*applied.lock().unwrap(), produced);
    assert_eq!(
        *peers.0.lock().unwrap(),
        ["upsert 2", "remove 2", "upsert 2", "upsert 3"]
    );
}
