//! Batching of small database operations: callers submit one item each and await its own
//! answer; a task takes whatever has queued up (up to a maximum) and handles it in one go.
//! Under load batches grow by themselves; when idle each item goes alone, without delay.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

type Pending<T, R> = (T, oneshot::Sender<R>);

pub struct Batcher<T, R> {
    tx: mpsc::Sender<Pending<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task; `handle` answers a batch with one result per item, in order. The
    /// task ends when every `Batcher` clone is dropped.
    pub fn start<F, Fut>(max: usize, handle: F) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send,
    {
        Self::start_lingering(max, Duration::ZERO, handle)
    }

    /// Like `start`, but a batch that is not full waits up to `linger` for more items:
    /// fewer, larger batches when each item's answer may come a little later.
    pub fn start_lingering<F, Fut>(
        max: usize,
        linger: Duration,
        mut handle: F,
    ) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Pending<T, R>>(4 * max);
        let task = tokio::spawn(async move {
            let mut pending = Vec::with_capacity(max);
            while rx.recv_many(&mut pending, max).await > 0 {
                if !linger.is_zero() && pending.len() < max {
                    let until = tokio::time::Instant::now() + linger;
                    while pending.len() < max {
                        let more = max - pending.len();
                        match tokio::time::timeout_at(until, rx.recv_many(&mut pending, more)).await
                        {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
                let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = pending.drain(..).unzip();
                for (reply, result) in replies.into_iter().zip(handle(items).await) {
                    let _ = reply.send(result);
                }
            }
        });
        (Batcher { tx }, task)
    }

    /// Submits one item and waits for its answer; `None` if the task has stopped.
    pub async fn call(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_answer() {
        let (batcher, task) = Batcher::start(8, |items: Vec<u32>| async move {
            items.into_iter().map(|i| i * 10).collect()
        });
        let calls = (0..50).map(|i| {
            let b = batcher.clone();
            async move { b.call(i).await }
        });
        let answers = futures::future::join_all(calls).await;
        assert_eq!(answers, (0..50).map(|i| Some(i * 10)).collect::<Vec<_>>());
        drop(batcher);
        task.await.unwrap();
    }
}
