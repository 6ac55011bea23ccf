//! Request handlers of the coordinator, run against the store without any socket.
//!
//! The QUIC shell decodes a request, calls [`handle`] on a blocking thread and writes
//! the answer back. Watch streams are the shell's (they live as long as the stream);
//! this module only authenticates them.

use crate::coord::keys;
use crate::coord::limits::LimitError;
use crate::coord::token::{encode_secret, hash_secret};
use crate::store::{Store, StoreError};
use crate::wire::control::{Auth, Device, ErrorCode, RegisterRequest, Request, Response};

/// Maps a store error to what the caller is told. Internal failures are not described
/// to the caller; the shell logs them.
pub fn error_response(err: &StoreError) -> Response {
    let code = match err {
        StoreError::InvalidToken => ErrorCode::InvalidToken,
        StoreError::TokenExpired => ErrorCode::TokenExpired,
        StoreError::TokenUsed => ErrorCode::TokenUsed,
        StoreError::Unauthorized => ErrorCode::Unauthorized,
        StoreError::Invalid(_) | StoreError::Policy(_) => ErrorCode::InvalidRequest,
        StoreError::Ipam(e) => match e {
            crate::coord::ipam::IpamError::Exhausted(_) => ErrorCode::PoolExhausted,
            crate::coord::ipam::IpamError::OutsidePrefix { .. }
            | crate::coord::ipam::IpamError::Reserved(_)
            | crate::coord::ipam::IpamError::Taken(_) => ErrorCode::AddressUnavailable,
            _ => ErrorCode::Conflict,
        },
        StoreError::DuplicateKey(_) | StoreError::OrgExists(_) | StoreError::Connected { .. } => {
            ErrorCode::Conflict
        }
        StoreError::OrgNotFound(_)
        | StoreError::DeviceNotFound(_)
        | StoreError::TokenNotFound(_)
        | StoreError::KeyNotFound(_) => ErrorCode::NotFound,
        StoreError::Sqlite(_)
        | StoreError::Postgres(_)
        | StoreError::Schema(_)
        | StoreError::Corrupt(_)
        | StoreError::Unavailable(_) => {
            return Response::Error {
                code: ErrorCode::Internal,
                message: "internal coordinator error".into(),
            };
        }
    };
    Response::Error {
        code,
        message: err.to_string(),
    }
}

/// A registration checked and ready for the store, with the device's new credential.
pub struct PreparedRegistration {
    pub req: RegisterRequest,
    pub token_hash: String,
    pub credential: String,
    pub credential_hash: String,
}

/// Checks a registration's key and makes its credential from `random`.
pub fn prepare_registration(
    req: RegisterRequest,
    random: [u8; 32],
) -> Result<PreparedRegistration, StoreError> {
    keys::parse_public_key(&req.public_key).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let credential = encode_secret(&random);
    Ok(PreparedRegistration {
        token_hash: hash_secret(&req.token_secret),
        credential_hash: hash_secret(&credential),
        credential,
        req,
    })
}

/// The answer to a registration the store accepted.
pub fn registered(device: Device, credential: String) -> Response {
    tracing::info!(
        id = device.id,
        hostname = %device.hostname,
        tunnel_ip = %device.tunnel_ip,
        tunnel_ip_v6 = ?device.tunnel_ip_v6,
        "device registered"
    );
    Response::Registered { device, credential }
}

/// Authenticates a device by its credential.
pub fn authenticate(store: &mut dyn Store, auth: &Auth) -> Result<Device, StoreError> {
    store.authenticate(auth.device_id, &hash_secret(&auth.credential))
}

/// Handles one request. `now` is unix seconds; `random` supplies a fresh device
/// credential on registration. Watch requests are answered by the shell. No update
/// rate limit (see [`handle_limited`]).
pub fn handle(
    store: &mut dyn Store,
    req: Request,
    now: i64,
    random: [u8; 32],
) -> Result<Response, StoreError> {
    handle_limited(store, req, now, random, &|_| Ok(()))
}

/// [`handle`], where an authenticated device's update is first passed to
/// `allow_update` (the shell's per-device rate limit); refused, nothing changes.
pub fn handle_limited(
    store: &mut dyn Store,
    req: Request,
    now: i64,
    random: [u8; 32],
    allow_update: &dyn Fn(i64) -> Result<(), LimitError>,
) -> Result<Response, StoreError> {
    match req {
        Request::Ping => Ok(Response::Pong),
        Request::Register(r) => {
            let p = prepare_registration(r, random)?;
            let device = store.register_device(&p.req, &p.token_hash, &p.credential_hash, now)?;
            Ok(registered(device, p.credential))
        }
        Request::Login {
            auth,
            ipv6_supported,
            ..
        } => {
            let device = store.login(
                auth.device_id,
                &hash_secret(&auth.credential),
                ipv6_supported,
                now,
            )?;
            Ok(Response::Device { device })
        }
        Request::Update { auth, update } => {
            let me = authenticate(store, &auth)?;
            allow_update(me.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
            let device = store.update_device(me.id, &update, now)?;
            Ok(Response::Device { device })
        }
        Request::Deregister { auth } => {
            let me = authenticate(store, &auth)?;
            store.remove_device(me.id, now)?;
            tracing::info!(id = me.id, hostname = %me.hostname, "device deregistered");
            Ok(Response::Ok)
        }
        Request::ReportPaths { auth, paths } => {
            let me = authenticate(store, &auth)?;
            store.report_paths(me.id, &paths, now)?;
            Ok(Response::Ok)
        }
        Request::Watch { .. } => Err(StoreError::Invalid(
            "watch is answered on its own stream".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DEFAULT_ORG, SqliteStore};
    use crate::wire::control::{DeviceUpdate, RegisterRequest};

    fn setup() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        s.ensure_default_org(0).unwrap();
        let org = s.org_by_name(DEFAULT_ORG).unwrap();
        s.create_token(org.id, &hash_secret("tok"), true, None, 0)
            .unwrap();
        (dir, s)
    }

    fn register(s: &mut SqliteStore, n: u8, token: &str) -> Result<Response, StoreError> {
        let secret = boringtun::x25519::StaticSecret::from([n; 32]);
        let public = boringtun::x25519::PublicKey::from(&secret);
        handle(
            s,
            Request::Register(RegisterRequest {
                token_secret: token.into(),
                public_key: keys::encode_key(public.as_bytes()),
                hostname: format!("n{n}"),
                os: "linux".into(),
                ipv6_supported: true,
                ..Default::default()
            }),
            1,
            [n; 32],
        )
    }

    #[test]
    fn register_then_login_and_update_only_self() {
        let (_d, mut s) = setup();
        let Response::Registered { device, credential } = register(&mut s, 1, "tok").unwrap()
        else {
            panic!("not registered")
        };
        let Response::Registered { device: b, .. } = register(&mut s, 2, "tok").unwrap() else {
            panic!("not registered")
        };
        let auth = Auth {
            device_id: device.id,
            credential: credential.clone(),
        };
        let resp = handle(
            &mut s,
            Request::Login {
                auth: auth.clone(),
                ipv6_supported: Some(true),
                instance: None,
            },
            2,
            [0; 32],
        )
        .unwrap();
        assert!(matches!(resp, Response::Device { device: d } if d.id == device.id));
        // Using A's credential with B's id is refused: a device changes only itself.
        let forged = Auth {
            device_id: b.id,
            credential,
        };
        let err = handle(
            &mut s,
            Request::Update {
                auth: forged,
                update: DeviceUpdate::default(),
            },
            3,
            [0; 32],
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Unauthorized));
        assert!(matches!(
            error_response(&err),
            Response::Error {
                code: ErrorCode::Unauthorized,
                ..
            }
        ));
        assert!(matches!(
            handle(&mut s, Request::Deregister { auth }, 4, [0; 32]).unwrap(),
            Response::Ok
        ));
        assert_eq!(s.device(device.id).unwrap(), None);
    }

    #[test]
    fn bad_token_and_bad_key_refused() {
        let (_d, mut s) = setup();
        let err = register(&mut s, 1, "wrong").unwrap_err();
        assert!(matches!(
            error_response(&err),
            Response::Error {
                code: ErrorCode::InvalidToken,
                ..
            }
        ));
        let mut r = RegisterRequest {
            token_secret: "tok".into(),
            public_key: keys::encode_key(&[0; 32]),
            hostname: "x".into(),
            ipv6_supported: true,
            ..Default::default()
        };
        let err = handle(&mut s, Request::Register(r.clone()), 1, [0; 32]).unwrap_err();
        assert!(err.to_string().contains("low-order"), "{err}");
        r.public_key = "garbage".into();
        let err = handle(&mut s, Request::Register(r), 1, [0; 32]).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
        assert_eq!(s.current_revision().unwrap(), 0);
    }
}
