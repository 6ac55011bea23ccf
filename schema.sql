-- nexodus coordinator schema: the only DDL source.
--
-- Embedded into the binary with include_str!. The file is a list of migrations, each
-- introduced by a line `-- migration: N`. On open, every migration whose N is above
-- `PRAGMA user_version` runs in its own transaction and then sets user_version = N.
-- Never edit a released migration: append a new one. SQL is kept portable (no SQLite
-- only types) where that costs nothing, so a PostgreSQL store can mirror it.

-- migration: 1

CREATE TABLE organizations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    ip_cidr     TEXT    NOT NULL,   -- IPv4 tunnel prefix, e.g. 100.64.0.0/10
    ip_cidr_v6  TEXT    NOT NULL,   -- IPv6 tunnel prefix, e.g. 200::/64
    created_at  INTEGER NOT NULL    -- unix seconds
);

CREATE TABLE devices (
    id                      INTEGER PRIMARY KEY AUTOINCREMENT,
    organization_id         INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    public_key              TEXT    NOT NULL UNIQUE,  -- WireGuard key, base64
    hostname                TEXT    NOT NULL,
    os                      TEXT    NOT NULL,
    tunnel_ip               TEXT    NOT NULL,         -- canonical text form
    tunnel_ip_v6            TEXT,                     -- NULL when the device has no IPv6
    organization_prefix     TEXT    NOT NULL,
    organization_prefix_v6  TEXT    NOT NULL,
    local_ip                TEXT,                     -- first v4 endpoint (LAN address)
    local_ip_v6             TEXT,                     -- first v6 endpoint (v6 underlay)
    endpoints               TEXT    NOT NULL DEFAULT '[]', -- JSON array of "ip:port"
    reflexive_endpoint      TEXT,                     -- "ip:port" as seen by STUN
    symmetric_nat           INTEGER NOT NULL DEFAULT 0,
    relay                   INTEGER NOT NULL DEFAULT 0,
    relay_only              INTEGER NOT NULL DEFAULT 0,
    ipv6_supported          INTEGER NOT NULL DEFAULT 1,
    advertise_cidrs         TEXT    NOT NULL DEFAULT '[]', -- JSON array of prefixes
    revision                INTEGER NOT NULL,         -- changes.revision of its last change
    last_seen               INTEGER NOT NULL,         -- unix seconds
    created_at              INTEGER NOT NULL,
    credential_hash         TEXT    NOT NULL,         -- sha256 of the device credential, hex
    UNIQUE (organization_id, tunnel_ip),
    UNIQUE (organization_id, tunnel_ip_v6)
);

CREATE INDEX devices_by_org ON devices (organization_id);

CREATE TABLE tokens (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    organization_id  INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    secret_hash      TEXT    NOT NULL UNIQUE,  -- sha256 of the secret, hex; never the secret
    reusable         INTEGER NOT NULL DEFAULT 0,
    expires_at       INTEGER,                  -- unix seconds; NULL = never
    uses             INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL
);

-- Every change to a device appends one row; its id is the global revision counter.
-- Watchers tail this log to push deltas, so a change costs what changed, not the org size.
CREATE TABLE changes (
    revision         INTEGER PRIMARY KEY AUTOINCREMENT,
    organization_id  INTEGER NOT NULL,
    device_id        INTEGER NOT NULL,
    kind             TEXT    NOT NULL,  -- 'upsert' or 'remove'
    created_at       INTEGER NOT NULL
);

-- migration: 2

-- Devices that run stock WireGuard (wg-quick export): relay-only spokes that
-- never talk to the coordinator themselves.
ALTER TABLE devices ADD COLUMN unmanaged INTEGER NOT NULL DEFAULT 0;

-- migration: 3

-- A device is online while it holds a watch stream to a coordinator. Nodes pick
-- their relay among online relays, so a dead relay's spokes move to another.
ALTER TABLE devices ADD COLUMN online INTEGER NOT NULL DEFAULT 0;

-- migration: 4

-- What a device claims that affects others (advertised prefixes, the relay and exit
-- roles) takes effect only once approved (DESIGN §13): an admin's approvals per
-- device, and the organization's policy file, whose [approve] section approves in
-- advance. Peers are sent the claims reduced to what is approved.
ALTER TABLE devices ADD COLUMN exit_node INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN approved_cidrs TEXT NOT NULL DEFAULT '[]'; -- JSON array of prefixes
ALTER TABLE devices ADD COLUMN relay_approved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN exit_approved INTEGER NOT NULL DEFAULT 0;

-- One validated policy file per organization (`nexodus policy set`); no row, or
-- NULL text (`policy clear`): no policy.
CREATE TABLE policies (
    organization_id  INTEGER PRIMARY KEY REFERENCES organizations(id) ON DELETE CASCADE,
    text             TEXT,              -- the file as given; NULL once cleared
    revision         INTEGER NOT NULL,  -- 1 for the first set, then +1 per set or clear
    updated_at       INTEGER NOT NULL
);

-- migration: 5

-- Mesh DNS (DESIGN §10): every organization has a domain, every device a name that
-- is one DNS label, unique in its organization (HOSTNAME.DOMAIN). The domain is
-- copied into each device row, like its organization's prefixes. Devices registered
-- before this migration get their names when the coordinator opens the database.
ALTER TABLE organizations ADD COLUMN domain TEXT NOT NULL DEFAULT 'nexodus.internal';
ALTER TABLE devices ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN domain TEXT NOT NULL DEFAULT 'nexodus.internal';
CREATE UNIQUE INDEX devices_name ON devices (organization_id, name) WHERE name <> '';

-- migration: 6

-- Remote administration (DESIGN §12): admin keys for the HTTPS API, stored by the
-- SHA-256 of their secret (never the secret); a revoked key keeps its row (listed,
-- never accepted again).
CREATE TABLE admin_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    secret_hash  TEXT    NOT NULL UNIQUE,  -- sha256 of the secret, hex
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER                   -- unix seconds; NULL = in force
);

-- Node path reports (direct or relay, handshake age per peer), newest per pair;
-- a device's rows go with it.
CREATE TABLE path_reports (
    device_id      INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    peer_id        INTEGER NOT NULL,
    path           TEXT    NOT NULL,   -- 'direct' or 'relay'
    handshake_age  INTEGER,            -- seconds; NULL = no handshake yet
    reported_at    INTEGER NOT NULL,
    PRIMARY KEY (device_id, peer_id)
);

-- migration: 7

-- Exits for relayed clients (DESIGN §8): the exit a device sends its internet
-- traffic through (a device id; NULL = none), so that the relay carries each
-- spoke's traffic to the exit it chose.
ALTER TABLE devices ADD COLUMN use_exit INTEGER;

-- migration: 8

-- IPv6 underlay (DESIGN §9): the device's v6 "ip:port" as the coordinator's STUN
-- server saw it over v6, beside the v4 reflexive_endpoint (NULL = none).
ALTER TABLE devices ADD COLUMN reflexive_endpoint_v6 TEXT;

-- migration: 9

-- The database's random identity. A watcher that reconnects names the database
-- and revision it last applied, to be sent only what changed since; a revision of
-- another database (this one wiped, or another one) is never taken for this one's.
-- Change-log entries of kind 'online' (a device going online or offline and nothing
-- else) exist from this migration on.
CREATE TABLE database_identity (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    value  INTEGER NOT NULL
);
INSERT INTO database_identity (id, value) VALUES (1, (random() & 9007199254740991) + 1);

-- migration: 10

-- Nothing for SQLite: one coordinator process knows every watch stream in memory.
-- (PostgreSQL's cluster_watches gained the node process's instance id and address.)
