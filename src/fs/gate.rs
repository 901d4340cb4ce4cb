//! The gate that keeps changes out of a directory while it is being moved.
//!
//! Why: a store has no directory rename. Moving a directory lists every object under its prefix, then copies and
//! deletes them one by one, and only at the end does the inode table put the directory under its new name. Anything
//! that wrote under the old prefix meanwhile went wrong in one of two ways: an object made after the listing (a new
//! file's upload, a `mkdir`'s marker, a file first written then) stayed under the old prefix, which came back holding
//! it; and a delete of an object already copied (an `unlink`) removed the old key while the copy stayed.
//!
//! So every operation that changes the names or the content under a directory enters the gate with the inodes it
//! works on (the directory whose entries change, or the file it changes), and a directory move waits until no such
//! operation under the directory is in flight, while new ones under it wait for the move to end. A waiting operation
//! resolves its paths only after it enters, so it works at the directory's new name. Entering is one lock and a map
//! insert when nothing is moving.
//!
//! Reading the names enters too: a lookup (at its directory), a directory listing, a readlink. Half way through a
//! move, the old prefix holds only what has not moved yet, so a lookup there answered ENOENT for a file already
//! carried over, and a listing missed it. Reads of file content through a descriptor do not enter (the hot path,
//! and they need no name): a read whose object went away under it waits until the move has ended
//! ([`TreeGate::settled`]) and reads again at the key the move left its descriptor. A GETATTR that must ask the
//! store (stale attributes) waits there too: a page of the old prefix would drop the names already moved. A file's
//! own rename counts as a move of that file, for the same reason.
//!
//! Deadlock freedom: an operation that has entered never enters again (the public entry points enter; what they call
//! inside does not), and a move only waits for operations that entered before it began. Other operations wait only
//! for moves. A move is itself an entered operation (the rename, at its two parents), so two moves could wait for each
//! other's entry (X into Y/ and Y into X/ at once): directory renames take `Fs::dir_moves` before they enter, so
//! at most one directory move is ever inside. A file's move waits only for operations entered at that file, and no
//! rename enters at a file (it enters at directories), so file moves never wait for a rename, nor for each other. A
//! move of a directory into itself is refused before it begins (it would wait for its own entry). Reads that wait
//! with [`TreeGate::settled`] have not entered: no move waits for them.

use std::collections::HashMap;
use std::sync::Mutex;

use super::inode::{InodeTable, ROOT_INO};

#[derive(Default)]
pub struct TreeGate {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Directories (and files) being moved.
    moving: Vec<u64>,
    /// Operations in flight, by id: the inodes each works on.
    active: HashMap<u64, Vec<u64>>,
    next: u64,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `ino` is `dir` or below it in `table` (an inode no longer in the table is below nothing).
pub fn is_under(table: &InodeTable, ino: u64, dir: u64) -> bool {
    let mut cur = ino;
    for _ in 0..4096 {
        if cur == dir {
            return true;
        }
        if cur == ROOT_INO {
            return false;
        }
        match table.get(cur) {
            Some(n) => cur = n.parent,
            None => return false,
        }
    }
    false
}

impl TreeGate {
    /// Enters an operation on `inos`: waits while a move of one of them, or of a directory above one, is running.
    /// `table` gives the inode table (locked after the gate's own lock, never before).
    pub async fn enter<'a, F>(&'a self, inos: &[u64], table: F) -> Entered<'a>
    where
        F: Fn() -> std::sync::MutexGuard<'a, InodeTable>,
    {
        let id = self
            .wait_until(|s| {
                let blocked = !s.moving.is_empty() && {
                    let t = table();
                    inos.iter().any(|&i| s.moving.iter().any(|&m| is_under(&t, i, m)))
                };
                (!blocked).then(|| {
                    let id = s.next;
                    s.next += 1;
                    s.active.insert(id, inos.to_vec());
                    id
                })
            })
            .await;
        Entered { gate: self, id: Some(id) }
    }

    /// Begins a move of `dir` (a directory, or a file): from now on operations under it wait; returns once those
    /// that entered before are done. The move ends when the returned guard drops.
    pub async fn begin_move<'a, F>(&'a self, dir: u64, table: F) -> Moving<'a>
    where
        F: Fn() -> std::sync::MutexGuard<'a, InodeTable>,
    {
        lock(&self.state).moving.push(dir);
        let guard = Moving { gate: self, dir };
        self.wait_until(|s| {
            let t = table();
            (!s.active.values().any(|inos| inos.iter().any(|&i| is_under(&t, i, dir)))).then_some(())
        })
        .await;
        guard
    }

    /// Waits until no move of `ino`, or of a directory above it, is running: at once when none is. For reads, which
    /// do not enter (they change nothing, and most never meet a move): one whose object went away under it asks
    /// again once the move that took it has ended, at the key the move left it.
    pub async fn settled<'a, F>(&'a self, ino: u64, table: F)
    where
        F: Fn() -> std::sync::MutexGuard<'a, InodeTable>,
    {
        self.wait_until(|s| (s.moving.is_empty() || !s.moving.iter().any(|&m| is_under(&table(), ino, m))).then_some(()))
            .await
    }

    /// Waits until `ready`, called under the gate's lock, gives an answer: it is called at once, then again after each
    /// change (an operation leaving, a move ending). The wake-up is armed before the check, so a change between the
    /// check and the wait is not missed.
    async fn wait_until<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(answer) = ready(&mut lock(&self.state)) {
                return answer;
            }
            notified.await;
        }
    }

    /// Whether a move is running (tests).
    #[cfg(test)]
    pub fn moves(&self) -> usize {
        lock(&self.state).moving.len()
    }
}

/// An operation inside the gate; it leaves when this drops.
pub struct Entered<'a> {
    gate: &'a TreeGate,
    id: Option<u64>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            lock(&self.gate.state).active.remove(&id);
            self.gate.changed.notify_waiters();
        }
    }
}

/// A move in progress; it ends when this drops.
pub struct Moving<'a> {
    gate: &'a TreeGate,
    dir: u64,
}

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.gate.state);
        if let Some(i) = s.moving.iter().position(|&d| d == self.dir) {
            s.moving.remove(i);
        }
        drop(s);
        self.gate.changed.notify_waiters();
    }
}
