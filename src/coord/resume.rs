//! Whether a reconnecting watcher can be brought current with a delta instead of a
//! whole snapshot, and what that delta holds of each device.
//!
//! A node names the database, organization and revision it last applied
//! ([`ResumeFrom`]). The coordinator's views ([`crate::serve::hub`]) know, per device,
//! the revision of its last change of any kind and of its last change of more than its
//! online flag, the devices removed and when, and when the policy last changed, all
//! back to a floor (the change log's oldest entry when the coordinator started, or
//! later). From a revision at or above the floor, the devices changed since are
//! exactly those with a newer revision: sent whole if more than their flag changed,
//! else as `(id, online)`; removals and the policy likewise. A revision of another
//! database (wiped and made anew, or another deployment: the ids differ), of another
//! organization, below the floor or ahead of the views is never trusted: the node
//! gets a snapshot. This module only decides; it holds nothing.

use crate::wire::control::ResumeFrom;

/// What the views can answer for, at the moment a watcher subscribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// The database's identity ([`crate::store::Store::database_id`]).
    pub database: i64,
    /// The watcher's organization.
    pub organization_id: i64,
    /// The oldest revision a delta can start from.
    pub floor: i64,
    /// The revision the views are at.
    pub current: i64,
}

/// How a watch stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A delta with what changed after `from`.
    Resume { from: i64 },
    /// The whole snapshot, and why.
    Snapshot(Why),
}

/// Why a watcher gets a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It named no revision (a new node, or an old version).
    NotAsked,
    /// Its revision belongs to another database (or it has none yet: database 0).
    OtherDatabase,
    OtherOrganization,
    /// Its revision is newer than the views (a database restored from a backup).
    Ahead,
    /// Its revision is older than what the views can answer for.
    TooOld,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAsked => "no revision named",
            Self::OtherDatabase => "revision of another database",
            Self::OtherOrganization => "revision of another organization",
            Self::Ahead => "revision ahead of this coordinator",
            Self::TooOld => "revision older than the change log",
        }
    }
}

/// Decides how a watch stream starts.
pub fn decide(asked: Option<&ResumeFrom>, have: &Coverage) -> Start {
    let Some(asked) = asked else {
        return Start::Snapshot(Why::NotAsked);
    };
    let why = if asked.database == 0 || asked.database != have.database {
        Why::OtherDatabase
    } else if asked.organization_id != have.organization_id {
        Why::OtherOrganization
    } else if asked.revision > have.current {
        Why::Ahead
    } else if asked.revision < have.floor || asked.revision < 0 {
        Why::TooOld
    } else {
        return Start::Resume {
            from: asked.revision,
        };
    };
    Start::Snapshot(why)
}

/// What a delta from `from` carries of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Nothing: the watcher has it as it is.
    Nothing,
    /// Only its online flag changed since.
    Online(bool),
    /// Its whole record.
    Record,
}

/// The part of a device whose last change is `revision` and whose last change of more
/// than its online flag is `content` (`content <= revision`).
pub fn part(from: i64, revision: i64, content: i64, online: bool) -> Part {
    if content > from {
        Part::Record
    } else if revision > from {
        Part::Online(online)
    } else {
        Part::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HAVE: Coverage = Coverage {
        database: 77,
        organization_id: 1,
        floor: 100,
        current: 500,
    };

    fn asked(database: i64, organization_id: i64, revision: i64) -> ResumeFrom {
        ResumeFrom {
            database,
            organization_id,
            revision,
        }
    }

    #[test]
    fn a_revision_the_views_cover_resumes() {
        for r in [100, 250, 500] {
            assert_eq!(
                decide(Some(&asked(77, 1, r)), &HAVE),
                Start::Resume { from: r }
            );
        }
    }

    #[test]
    fn anything_else_gets_a_snapshot() {
        let cases = [
            (None, Why::NotAsked),
            // The database was wiped and made anew (or it is another deployment):
            // the same revision numbers mean other data.
            (Some(asked(78, 1, 250)), Why::OtherDatabase),
            // A node that never had a snapshot.
            (Some(asked(0, 1, 250)), Why::OtherDatabase),
            (Some(asked(77, 2, 250)), Why::OtherOrganization),
            // A restored backup: the node saw revisions this database never had.
            (Some(asked(77, 1, 501)), Why::Ahead),
            // Changes before the floor (pruned from the log) are unknown.
            (Some(asked(77, 1, 99)), Why::TooOld),
            (Some(asked(77, 1, -1)), Why::TooOld),
        ];
        for (a, why) in cases {
            assert_eq!(decide(a.as_ref(), &HAVE), Start::Snapshot(why), "{a:?}");
        }
        // A coordinator that knows no database (0) trusts no revision.
        let none = Coverage {
            database: 0,
            ..HAVE
        };
        assert_eq!(
            decide(Some(&asked(0, 1, 250)), &none),
            Start::Snapshot(Why::OtherDatabase)
        );
    }

    #[test]
    fn a_device_is_sent_whole_only_when_more_than_its_flag_changed() {
        // Unchanged since: nothing.
        assert_eq!(part(300, 200, 150, true), Part::Nothing);
        assert_eq!(part(300, 300, 300, true), Part::Nothing);
        // Went offline and online again after: its flag (a coordinator restart).
        assert_eq!(part(300, 400, 150, true), Part::Online(true));
        assert_eq!(part(300, 400, 300, false), Part::Online(false));
        // Its endpoints changed after (then its flag): the record.
        assert_eq!(part(300, 400, 350, true), Part::Record);
        // A new device.
        assert_eq!(part(300, 301, 301, false), Part::Record);
    }
}
