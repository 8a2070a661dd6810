//! Embedded state in one redb file, `<state-dir>/sluice.redb`.
//!
//! Layout (schema version [`SCHEMA_VERSION`]):
//! - `meta`: `"schema_version"` → u64
//! - `networks`: network ID → JSON of [`Network`]
//! - `endpoints`: endpoint ID → JSON of [`Endpoint`]
//! - `pools`: pool ID → JSON of [`Pool`] (with its leases)
//! - `policies`: policy name → JSON of [`StoredPolicy`] (added without a version bump: an
//!   older file simply has no policies yet)
//!
//! Values are JSON so that a field added later (with `#[serde(default)]`) reads old records.
//! Every protocol call that changes state writes its [`Change`]s in ONE transaction, so a
//! crash (`kill -9`) leaves either the old state or the new, never half of a call.
//!
//! Group commit: writes go through one committer thread, in the order they were submitted.
//! Calls that arrive while a transaction is being made durable are coalesced into the next
//! one (one fsync for all of them), and each caller is answered only once its changes are
//! durable. If a coalesced transaction fails, each call's changes are retried in a
//! transaction of their own, so a call fails only for its own changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ipam::Pool;
use crate::model::{Endpoint, Network};
use crate::policy::StoredPolicy;

/// Version of the layout above; bumped with a migration when it changes.
pub const SCHEMA_VERSION: u64 = 1;

/// redb's page cache. Its default (1 GiB) keeps every page ever read or written resident,
/// among them those of a 100k-entry policy; the daemon reads the database once at start and
/// then only writes, so a small cache costs nothing.
const CACHE_BYTES: usize = 1 << 20;
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("state store {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A record could not be encoded or decoded.
    #[error("state store {path}: record {key:?} in {table}: {source}")]
    Record {
        /// The database file.
        path: PathBuf,
        /// Table name.
        table: &'static str,
        /// Record key.
        key: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The file was written by a newer sluice.
    #[error(
        "state store {path} has schema version {found}, this sluice understands up to {SCHEMA_VERSION}; upgrade sluice"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: u64,
    },
    /// The committer thread is gone (the process is shutting down).
    #[error("state store {path}: the committer has stopped")]
    Closed {
        /// The database file.
        path: PathBuf,
    },
    /// The state directory could not be created.
    #[error("state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// One change to persist.
#[derive(Debug, Clone)]
pub enum Change {
    /// Insert or replace a network.
    PutNetwork(Network),
    /// Remove a network.
    DeleteNetwork(String),
    /// Insert or replace an endpoint.
    PutEndpoint(Endpoint),
    /// Remove an endpoint.
    DeleteEndpoint(String),
    /// Insert or replace a pool.
    PutPool(Pool),
    /// Remove a pool.
    DeletePool(String),
    /// Insert or replace a policy (keyed by its name).
    PutPolicy(StoredPolicy),
    /// Remove a policy.
    DeletePolicy(String),
}

/// Everything the store holds, read at start-up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Networks.
    pub networks: Vec<Network>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// IPAM pools.
    pub pools: Vec<Pool>,
    /// Policies, by name.
    pub policies: Vec<StoredPolicy>,
}

/// The embedded store. Clones are handles to the same database and the same committer, so
/// the policy layer and the driver can share one file.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    committer: Arc<Committer>,
}

/// Largest number of calls coalesced into one transaction.
const MAX_BATCH: usize = 256;

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One call's changes and how to answer it.
struct Job {
    changes: Vec<Change>,
    reply: Reply,
}

/// The committer thread and the queue to it; the thread ends (and is joined) when the last
/// [`Store`] handle goes, so the file is closed when `Store` is dropped.
#[derive(Debug)]
struct Committer {
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("state store committer panicked");
        }
    }
}

/// A submitted change set; [`Commit::durable`] waits until it is on disk.
#[derive(Debug)]
#[must_use = "a commit is only durable once awaited"]
pub struct Commit {
    rx: Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
    path: PathBuf,
}

impl Commit {
    /// Waits until the changes are durable (or failed; then none of them were written).
    ///
    /// # Errors
    /// The transaction's error, or [`StoreError::Closed`].
    pub async fn durable(self) -> Result<(), StoreError> {
        match self.rx {
            None => Ok(()),
            Some(rx) => rx
                .await
                .unwrap_or(Err(StoreError::Closed { path: self.path })),
        }
    }
}

impl Store {
    /// Opens (or creates) `<dir>/sluice.redb`, creating `dir` with mode 0700 if needed.
    ///
    /// # Errors
    /// When the directory or database cannot be opened, or was written by a newer schema.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        let path = dir.join("sluice.redb");
        let db = Arc::new(
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
                .map_err(|e| db_err(&path, e))?,
        );
        let (queue, jobs) = mpsc::channel::<Job>();
        let thread = {
            let (db, file) = (Arc::clone(&db), path.clone());
            std::thread::Builder::new()
                .name("sluice-store".into())
                .spawn(move || commit_loop(&db, &file, &jobs))
                .map_err(|source| StoreError::Dir {
                    path: path.clone(),
                    source,
                })?
        };
        let store = Self {
            db,
            path,
            committer: Arc::new(Committer {
                queue: Some(queue),
                thread: Some(thread),
            }),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// Path of the database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema {
                        path: self.path.clone(),
                        found: v,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| self.err(e))?;
                }
            }
            // Create the tables so that reads of a fresh store find them.
            txn.open_table(NETWORKS).map_err(|e| self.err(e))?;
            txn.open_table(ENDPOINTS).map_err(|e| self.err(e))?;
            txn.open_table(POOLS).map_err(|e| self.err(e))?;
            txn.open_table(POLICIES).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Reads everything.
    ///
    /// # Errors
    /// On database errors or undecodable records.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        Ok(Snapshot {
            networks: self.read_all(&txn, NETWORKS, "networks")?,
            endpoints: self.read_all(&txn, ENDPOINTS, "endpoints")?,
            pools: self.read_all(&txn, POOLS, "pools")?,
            policies: self.read_all(&txn, POLICIES, "policies")?,
        })
    }

    /// Reads the applied policies, by name (what `sluice policy get/ls` show: the policy
    /// engine keeps no copy of the documents).
    ///
    /// # Errors
    /// On database errors or undecodable records.
    pub fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        self.read_all(&txn, POLICIES, "policies")
    }

    fn read_all<T: DeserializeOwned>(
        &self,
        txn: &redb::ReadTransaction,
        def: TableDefinition<&str, &[u8]>,
        name: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let table = txn.open_table(def).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let record =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Record {
                    path: self.path.clone(),
                    table: name,
                    key: k.value().to_owned(),
                    source,
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Applies `changes` in one transaction: all or nothing. Blocks until they are durable
    /// (coalesced with concurrent calls, see the module docs).
    ///
    /// # Errors
    /// On database errors; nothing is written then.
    pub fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(
            changes.to_vec(),
            Box::new(move |r| {
                let _sent = tx.send(r);
            }),
        )?;
        rx.recv().unwrap_or_else(|_| Err(self.closed()))
    }

    /// Queues `changes` for the next transaction and returns at once; await
    /// [`Commit::durable`] for the outcome. Changes are written in the order they were
    /// submitted, so submitting under the owner's lock keeps the store in the owner's order.
    pub fn submit(&self, changes: Vec<Change>) -> Commit {
        if changes.is_empty() {
            return Commit {
                rx: None,
                path: self.path.clone(),
            };
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A failed enqueue drops `tx`: `durable` then reports `Closed`.
        let _queued = self.enqueue(
            changes,
            Box::new(move |r| {
                let _sent = tx.send(r);
            }),
        );
        Commit {
            rx: Some(rx),
            path: self.path.clone(),
        }
    }

    fn enqueue(&self, changes: Vec<Change>, reply: Reply) -> Result<(), StoreError> {
        self.committer
            .queue
            .as_ref()
            .ok_or_else(|| self.closed())?
            .send(Job { changes, reply })
            .map_err(|_| self.closed())
    }

    fn closed(&self) -> StoreError {
        StoreError::Closed {
            path: self.path.clone(),
        }
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        db_err(&self.path, e)
    }
}

/// The committer: takes every job queued while the previous transaction was being written,
/// writes them in one transaction, answers each.
fn commit_loop(db: &Database, path: &Path, jobs: &mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = write_changes(db, path, batch.iter().flat_map(|j| &j.changes));
        tracing::debug!(
            calls = batch.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "store: group commit"
        );
        match result {
            Ok(()) => {
                for job in batch {
                    (job.reply)(Ok(()));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(job) = batch.pop() {
                    (job.reply)(Err(e));
                }
            }
            // One call's bad change must not fail the others: each alone, in order.
            Err(_) => {
                for job in batch {
                    let r = write_changes(db, path, job.changes.iter());
                    (job.reply)(r);
                }
            }
        }
    }
}

fn encode<T: Serialize>(
    path: &Path,
    table: &'static str,
    key: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Record {
        path: path.to_path_buf(),
        table,
        key: key.to_owned(),
        source,
    })
}

/// `changes` in one transaction.
fn write_changes<'a>(
    db: &Database,
    path: &Path,
    changes: impl Iterator<Item = &'a Change>,
) -> Result<(), StoreError> {
    let err = |e: redb::Error| db_err(path, e);
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    {
        let mut networks = txn.open_table(NETWORKS).map_err(|e| err(e.into()))?;
        let mut endpoints = txn.open_table(ENDPOINTS).map_err(|e| err(e.into()))?;
        let mut pools = txn.open_table(POOLS).map_err(|e| err(e.into()))?;
        let mut policies = txn.open_table(POLICIES).map_err(|e| err(e.into()))?;
        for change in changes {
            let done = match change {
                Change::PutNetwork(n) => {
                    let v = encode(path, "networks", &n.id, n)?;
                    networks.insert(n.id.as_str(), v.as_slice()).map(drop)
                }
                Change::DeleteNetwork(id) => networks.remove(id.as_str()).map(drop),
                Change::PutEndpoint(ep) => {
                    let v = encode(path, "endpoints", &ep.id, ep)?;
                    endpoints.insert(ep.id.as_str(), v.as_slice()).map(drop)
                }
                Change::DeleteEndpoint(id) => endpoints.remove(id.as_str()).map(drop),
                Change::PutPool(p) => {
                    let v = encode(path, "pools", &p.id, p)?;
                    pools.insert(p.id.as_str(), v.as_slice()).map(drop)
                }
                Change::DeletePool(id) => pools.remove(id.as_str()).map(drop),
                Change::PutPolicy(p) => {
                    let v = encode(path, "policies", &p.doc.name, p)?;
                    policies.insert(p.doc.name.as_str(), v.as_slice()).map(drop)
                }
                Change::DeletePolicy(name) => policies.remove(name.as_str()).map(drop),
            };
            done.map_err(|e| err(e.into()))?;
        }
    }
    txn.commit().map_err(|e| err(e.into()))
}

fn db_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Mode;

    fn network(id: &str) -> Network {
        Network {
            id: id.into(),
            mode: Mode::Bridge,
            bridge: crate::names::bridge(id),
            mtu: Some(1400),
            internal: false,
            ipv4: vec![],
            ipv6: vec![],
            options: BTreeMap::new(),
            number: 1,
            isolate: true,
            ingress_deny: false,
            masquerade: true,
            ipv6_nat: false,
            name: None,
            macvlan: None,
            vxlan: None,
        }
    }

    #[test]
    fn changes_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .apply(&[
                    Change::PutNetwork(network("n1")),
                    Change::PutNetwork(network("n2")),
                ])
                .unwrap();
            store.apply(&[Change::DeleteNetwork("n1".into())]).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.networks, vec![network("n2")]);
        assert!(snap.endpoints.is_empty());
    }

    /// Concurrent submissions are coalesced but written in submission order: the last put
    /// of a key wins, and every submission is durable once awaited (seen after a reopen).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submissions_keep_their_order_and_are_durable_when_awaited() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let commits: Vec<Commit> = (0..200u32)
                .map(|i| {
                    let mut n = network(&format!("n{}", i % 7));
                    n.number = i;
                    store.submit(vec![Change::PutNetwork(n)])
                })
                .collect();
            let waits: Vec<_> = commits
                .into_iter()
                .map(|c| tokio::spawn(c.durable()))
                .collect();
            for w in waits {
                w.await.unwrap().unwrap();
            }
            // The sync path goes through the same queue, after everything above.
            store.apply(&[Change::DeleteNetwork("n6".into())]).unwrap();
        }
        let mut nets = Store::open(dir.path()).unwrap().load().unwrap().networks;
        nets.sort_by_key(|n| n.id.clone());
        let numbers: Vec<(String, u32)> = nets.into_iter().map(|n| (n.id, n.number)).collect();
        // Last i below 200 with i % 7 == k.
        let want: Vec<(String, u32)> = (0..6u32)
            .map(|k| {
                (
                    format!("n{k}"),
                    (0..200).filter(|i| i % 7 == k).max().unwrap(),
                )
            })
            .collect();
        assert_eq!(numbers, want);
    }

    #[test]
    fn deleting_unknown_records_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .apply(&[
                Change::DeleteEndpoint("nope".into()),
                Change::DeletePool("nope".into()),
            ])
            .unwrap();
        assert!(store.load().unwrap().pools.is_empty());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("upgrade sluice"), "{err}");
    }

    #[test]
    fn corrupt_record_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(NETWORKS)
            .unwrap()
            .insert("bad", b"{not json".as_slice())
            .unwrap();
        txn.commit().unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("\"bad\""), "{err}");
    }
}
