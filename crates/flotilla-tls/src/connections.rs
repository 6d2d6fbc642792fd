//! The connections a listener holds, so that hostile clients cannot exhaust them: at most
//! `cap` at a time, and when a new one arrives at the cap, the connection idle the longest
//! (no request in flight: a TLS handshake never finished, headers sent byte by byte, an HTTP/2
//! connection that asks nothing) is closed to make room. Connections with a request in flight
//! (a watch, a log stream) are never evicted; connections idle beyond the idle timeout are
//! closed by [`Registry::sweep`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// One connection as the registry sees it.
pub struct Conn {
    id: u64,
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Notified when the connection must close.
    pub close: Notify,
}

impl Conn {
    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| self.idle_since.lock().expect("idle lock").elapsed())
    }
}

/// A request in flight on a connection; the connection is idle again when the last one ends
/// (when its response body has been sent or dropped).
pub struct InFlight(Arc<Conn>);

impl InFlight {
    pub fn begin(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("idle lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Registry {
    cap: usize,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

/// What [`Registry::admit`] decided.
pub enum Admission {
    /// Serve it; the other connection (if any) was closed to make room.
    Admitted { conn: Arc<Conn>, evicted: bool },
    /// Every connection is busy: this one is refused.
    Full,
}

impl Registry {
    pub fn new(cap: usize) -> Self {
        Registry {
            cap: cap.max(1),
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a new connection, evicting the longest-idle one at the cap.
    pub fn admit(&self) -> Admission {
        let mut conns = self.conns.lock().expect("registry lock");
        let mut evicted = false;
        if conns.len() >= self.cap {
            let oldest = conns
                .values()
                .filter_map(|c| c.idle_for().map(|idle| (idle, c.id)))
                .max_by_key(|(idle, _)| *idle)
                .map(|(_, id)| id);
            match oldest.and_then(|id| conns.remove(&id)) {
                Some(victim) => {
                    victim.close.notify_one();
                    evicted = true;
                }
                None => return Admission::Full,
            }
        }
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            close: Notify::new(),
        });
        conns.insert(conn.id, conn.clone());
        Admission::Admitted { conn, evicted }
    }

    /// Forgets a connection that has ended.
    pub fn release(&self, conn: &Conn) {
        self.conns.lock().expect("registry lock").remove(&conn.id);
    }

    /// Closes the connections idle for longer than `idle`; returns how many.
    pub fn sweep(&self, idle: Duration) -> usize {
        let mut conns = self.conns.lock().expect("registry lock");
        let stale: Vec<u64> = conns
            .values()
            .filter(|c| c.idle_for().is_some_and(|d| d > idle))
            .map(|c| c.id)
            .collect();
        for id in &stale {
            if let Some(c) = conns.remove(id) {
                c.close.notify_one();
            }
        }
        stale.len()
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> (Arc<Conn>, bool) {
        match a {
            Admission::Admitted { conn, evicted } => (conn, evicted),
            Admission::Full => panic!("refused"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_idle_connection_makes_room_and_busy_ones_stay() {
        let r = Registry::new(3);
        let (a, _) = admitted(r.admit());
        tokio::time::advance(Duration::from_secs(1)).await;
        let (b, _) = admitted(r.admit());
        tokio::time::advance(Duration::from_secs(1)).await;
        let (c, _) = admitted(r.admit());
        let busy = InFlight::begin(&a);
        // At the cap: b (idle 1 s; a is busy) goes.
        let (d, evicted) = admitted(r.admit());
        assert!(evicted);
        assert_eq!(r.len(), 3);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), b.close.notified())
                .await
                .is_ok(),
            "b was told to close"
        );
        // Everyone busy: refused.
        let _busy = (InFlight::begin(&c), InFlight::begin(&d));
        assert!(matches!(r.admit(), Admission::Full));
        drop(busy);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            r.sweep(Duration::from_secs(5)),
            1,
            "a is idle again, and stale"
        );
        assert_eq!(r.len(), 2);
        r.release(&c);
        assert_eq!(r.len(), 1);
    }
}
