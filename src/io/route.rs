//! Kernel routes through the node's interface, set with iproute2's `ip`.
//!
//! Routes change only when peers change (never per packet). Changes that arrive
//! together (a snapshot of thousands of peers) go to one `ip -force -batch -` (one
//! process, one netlink socket, [`batch`]), not one `ip` per route; the commands are
//! still what an operator types.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    Spawn(std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs `ip ARGS`; a failure carries the command line and what `ip` said.
pub(super) fn ip<S: AsRef<str>>(args: &[S]) -> Result<(), RouteError> {
    let out = Command::new("ip")
        .args(args.iter().map(AsRef::as_ref))
        .output()
        .map_err(RouteError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RouteError::Failed {
            args: args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn family(net: &IpNet) -> &'static str {
    if net.addr().is_ipv4() { "-4" } else { "-6" }
}

/// What [`add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Added,
    /// The host already has a route for this prefix (its own, or ours from before):
    /// it is left as it is, never replaced.
    Exists,
}

/// Routes `net` to `dev`, unless a route for the same prefix exists: a peer's
/// prefix never overwrites a route of the host (`ip route add`, not `replace`).
pub fn add(dev: &str, net: IpNet) -> Result<Added, RouteError> {
    match ip(&[family(&net), "route", "add", &net.to_string(), "dev", dev]) {
        Ok(()) => Ok(Added::Added),
        Err(RouteError::Failed { stderr, .. }) if stderr.contains("File exists") => {
            Ok(Added::Exists)
        }
        Err(e) => Err(e),
    }
}

/// Removes the route for `net` through `dev`; a route already gone is not an error.
pub fn remove(dev: &str, net: IpNet) -> Result<(), RouteError> {
    match ip(&[family(&net), "route", "del", &net.to_string(), "dev", dev]) {
        Err(RouteError::Failed { stderr, .. }) if stderr.contains("No such process") => Ok(()),
        other => other,
    }
}

/// One change of a [`batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Remove,
}

/// What became of one change of a [`batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// An add found a route for the prefix (left as it is, as [`add`] does).
    Exists,
    /// A remove found no route (not an error, as in [`remove`]).
    Gone,
    /// What `ip` said.
    Failed(String),
}

/// Applies `changes` through `dev`, in order, with one `ip -force -batch -` (which
/// goes on after a failed line); the outcome of each change, in the same order.
pub fn batch(dev: &str, changes: &[(Op, IpNet)]) -> Result<Vec<Outcome>, RouteError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let mut script = String::with_capacity(changes.len() * 48);
    for (op, net) in changes {
        let verb = match op {
            Op::Add => "add",
            Op::Remove => "del",
        };
        // The prefix gives the family: no -4/-6 (not taken per line).
        script.push_str(&format!("route {verb} {net} dev {dev}\n"));
    }
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RouteError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as failed lines below.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(RouteError::Spawn)?;
    Ok(outcomes(changes, &String::from_utf8_lossy(&out.stderr)))
}

/// Reads `ip -batch`'s stderr: each failure is its message, then `Command failed
/// -:LINE` (lines count from 1).
fn outcomes(changes: &[(Op, IpNet)], stderr: &str) -> Vec<Outcome> {
    let mut result = vec![Outcome::Done; changes.len()];
    let mut message = Vec::new();
    for line in stderr.lines() {
        let Some(n) = line
            .strip_prefix("Command failed -:")
            .and_then(|n| n.trim().parse::<usize>().ok())
        else {
            message.push(line.trim());
            continue;
        };
        let text = message.join("; ");
        message.clear();
        let Some(i) = n.checked_sub(1) else { continue };
        let (Some(slot), Some((op, _))) = (result.get_mut(i), changes.get(i)) else {
            continue;
        };
        *slot = match op {
            Op::Add if text.contains("File exists") => Outcome::Exists,
            Op::Remove if text.contains("No such process") => Outcome::Gone,
            _ => Outcome::Failed(text),
        };
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_are_matched_to_their_lines() {
        let net = |s: &str| s.parse::<IpNet>().expect("literal");
        let changes = [
            (Op::Add, net("10.9.0.0/24")),
            (Op::Add, net("10.9.0.0/24")),
            (Op::Remove, net("10.8.0.0/24")),
            (Op::Add, net("2001:db8::/64")),
            (Op::Remove, net("10.7.0.0/24")),
        ];
        let stderr = "RTNETLINK answers: File exists\nCommand failed -:2\n\
                      RTNETLINK answers: No such process\nCommand failed -:3\n\
                      Error: Nexthop device is not up.\nCommand failed -:5\n";
        assert_eq!(
            outcomes(&changes, stderr),
            [
                Outcome::Done,
                Outcome::Exists,
                Outcome::Gone,
                Outcome::Done,
                Outcome::Failed("Error: Nexthop device is not up.".into()),
            ]
        );
    }
}
