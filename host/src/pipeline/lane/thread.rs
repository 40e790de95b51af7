//! A lane's own thread for its plugin calls.
//!
//! A plugin call runs wasm code and may take up to its CPU deadline, so it is kept off the
//! async executor. Tokio's blocking pool hands each call to whichever of its threads has been
//! idle longest: with eight lanes the calls rotated over about twenty threads, each waking cold
//! (its stack, its allocator's pages, the blocks it lifted last time and other threads freed
//! since). A lane makes one call at a time, so a thread of its own serves it without any lane
//! waiting for another, and every call finds the memory the last one used (docs/bench.md,
//! "Round 20").
//!
//! The thread is started with the lane's first call and ends when the lane does. A call that
//! panics is reported as failed and the thread goes on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use tokio::sync::oneshot;

type Work = Box<dyn FnOnce() + Send>;

/// The stack of a lane's thread: tokio's blocking threads', where the calls ran before. Wasm
/// runs on it (wasmtime stops a guest at 512 KiB of wasm stack); std's default would follow
/// `RUST_MIN_STACK`, which could make it smaller than that.
const STACK_BYTES: usize = 2 << 20;

/// The calling end of a lane's thread.
#[derive(Default)]
pub(super) struct CallThread {
    work: Option<mpsc::Sender<Work>>,
}

/// The call's task failed: it panicked, or the thread could not be started.
#[derive(Debug, thiserror::Error)]
pub(super) enum CallFailed {
    #[error("the plugin call panicked")]
    Panicked,
    #[error("cannot start the lane's call thread: {0}")]
    Spawn(std::io::Error),
}

impl CallThread {
    /// Runs `call` on the lane's thread and waits for its result.
    pub(super) async fn run<T: Send + 'static>(
        &mut self,
        name: &str,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CallFailed> {
        let (done, result) = oneshot::channel();
        let work: Work = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(call)).map_err(|_| CallFailed::Panicked);
            // The lane may have stopped waiting (shutdown): then nobody wants the result.
            let _ = done.send(outcome);
        });
        let work = match &self.work {
            Some(tx) => tx.send(work).err().map(|mpsc::SendError(work)| work),
            None => Some(work),
        };
        if let Some(work) = work {
            // Not started yet (or gone, which a caught panic cannot cause): start it.
            let tx = spawn(name).map_err(CallFailed::Spawn)?;
            tx.send(work).map_err(|_| CallFailed::Panicked)?;
            self.work = Some(tx);
        }
        result.await.unwrap_or(Err(CallFailed::Panicked))
    }
}

fn spawn(name: &str) -> std::io::Result<mpsc::Sender<Work>> {
    let (tx, rx) = mpsc::channel::<Work>();
    std::thread::Builder::new()
        // A plugin's name comes from a file name, which cannot hold a NUL (a thread name must
        // not); Linux shows the first 15 bytes.
        .name(format!("call:{name}"))
        .stack_size(STACK_BYTES)
        .spawn(move || {
            while let Ok(work) = rx.recv() {
                work();
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_on_one_thread_and_a_panic_is_an_error_not_the_end() {
        let mut thread = CallThread::default();
        let first = thread
            .run("t", || std::thread::current().id())
            .await
            .unwrap();
        let panicked = thread.run("t", || -> u32 { panic!("boom") }).await;
        assert!(matches!(panicked, Err(CallFailed::Panicked)));
        let second = thread
            .run("t", || std::thread::current().id())
            .await
            .unwrap();
        assert_eq!(first, second);
        assert_ne!(first, std::thread::current().id());
    }
}
