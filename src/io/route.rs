//! Kernel routes through the node's interface, set with iproute2's `ip`.
//!
//! Routes change only when peers change (never per packet), so running `ip` costs
//! nothing that matters and keeps the output identical to what an operator types.

use std::process::Command;

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
