//! Batching of small database operations: callers submit one item each and await its own
//! answer; a task takes whatever has queued up (up to a maximum) and handles it in one go.
//! Under load batches grow by themselves; when idle each item goes alone, without delay
//! (unless the batcher is shaped to linger for company, and no caller in the batch is in a
//! hurry).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

/// An item, where its answer goes, and whether its caller is in a hurry (`call_soon`).
type Pending<T, R> = (T, oneshot::Sender<R>, bool);

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

/// How a batcher forms and handles its batches.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Items per batch, at most.
    pub max: usize,
    /// How long a batch that is not full waits for more items: fewer, larger batches when
    /// each item's answer may come a little later. (Measured: lingering only until its
    /// first item had waited this long made batches smaller under load, and every event
    /// dearer: BENCHMARKS.md.)
    pub linger: Duration,
    /// Batches handled at once. While all are under way, items queue up for the next one.
    pub concurrent: usize,
}

impl Shape {
    /// Up to `max` items, no waiting, one batch at a time.
    pub fn serial(max: usize) -> Shape {
        Shape {
            max,
            linger: Duration::ZERO,
            concurrent: 1,
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task; `handle` answers a batch with one result per item, in order. The
    /// task ends when every `Batcher` clone is dropped, after the batches under way.
    pub fn start<F, Fut>(shape: Shape, mut handle: F) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let max = shape.max.max(1);
        let (tx, mut rx) = mpsc::channel::<Pending<T, R>>(4 * max);
        let task = tokio::spawn(async move {
            let turns = Arc::new(Semaphore::new(shape.concurrent.max(1)));
            let under_way = tokio_util::task::TaskTracker::new();
            loop {
                // A turn first: while every batch is under way, the next one grows.
                let Ok(turn) = turns.clone().acquire_owned().await else {
                    break;
                };
                let mut pending = Vec::with_capacity(max);
                if rx.recv_many(&mut pending, max).await == 0 {
                    break;
                }
                let hurried = |pending: &[Pending<T, R>]| pending.iter().any(|p| p.2);
                if !shape.linger.is_zero() && pending.len() < max && !hurried(&pending) {
                    let until = tokio::time::Instant::now() + shape.linger;
                    while pending.len() < max {
                        let seen = pending.len();
                        let more = max - pending.len();
                        match tokio::time::timeout_at(until, rx.recv_many(&mut pending, more)).await
                        {
                            Ok(0) | Err(_) => break,
                            Ok(_) if hurried(&pending[seen..]) => break,
                            Ok(_) => {}
                        }
                    }
                }
                let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = pending
                    .into_iter()
                    .map(|(item, reply, _)| (item, reply))
                    .unzip();
                let answers = handle(items);
                under_way.spawn(async move {
                    for (reply, result) in replies.into_iter().zip(answers.await) {
                        let _ = reply.send(result);
                    }
                    drop(turn);
                });
            }
            under_way.close();
            under_way.wait().await;
        });
        (Batcher { tx }, task)
    }

    /// Submits one item and waits for its answer; `None` if the task has stopped.
    pub async fn call(&self, item: T) -> Option<R> {
        self.submit(item, false).await
    }

    /// As `call`, for a caller in a hurry: the batch that takes the item stops lingering
    /// and goes at once.
    pub async fn call_soon(&self, item: T) -> Option<R> {
        self.submit(item, true).await
    }

    async fn submit(&self, item: T, soon: bool) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply, soon)).await.ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_answer() {
        let (batcher, task) = Batcher::start(Shape::serial(8), |items: Vec<u32>| async move {
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

    #[tokio::test]
    async fn a_second_batch_goes_while_the_first_is_under_way() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let held = gate.clone();
        let shape = Shape {
            concurrent: 2,
            ..Shape::serial(8)
        };
        let (batcher, task) = Batcher::start(shape, move |items: Vec<u32>| {
            let held = held.clone();
            async move {
                if items.contains(&0) {
                    held.notified().await;
                }
                items
            }
        });
        let first = call_in_background(&batcher, 0);
        // Item 0's batch is taken (and blocked) before item 1 is sent.
        tokio::task::yield_now().await;
        while !first.is_finished() && batcher.tx.capacity() < batcher.tx.max_capacity() {
            tokio::task::yield_now().await;
        }
        let second = tokio::time::timeout(Duration::from_secs(5), batcher.call(1)).await;
        assert_eq!(second, Ok(Some(1)), "the second batch waited for the first");
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Some(0));
        drop(batcher);
        task.await.unwrap();
    }

    /// A batcher lingering `linger` that answers each item with the size of its batch.
    fn answering_batch_sizes(linger: Duration) -> Batcher<u32, usize> {
        let shape = Shape {
            linger,
            ..Shape::serial(8)
        };
        Batcher::start(shape, |items: Vec<u32>| async move {
            vec![items.len(); items.len()]
        })
        .0
    }

    /// Submits `item` from a task of its own: its answer comes once its batch goes.
    fn call_in_background<R: Send + 'static>(
        batcher: &Batcher<u32, R>,
        item: u32,
    ) -> tokio::task::JoinHandle<Option<R>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.call(item).await })
    }

    #[tokio::test(start_paused = true)]
    async fn items_submitted_within_the_linger_share_a_batch() {
        let linger = Duration::from_secs(10);
        let batcher = answering_batch_sizes(linger);
        let first = call_in_background(&batcher, 0);
        tokio::time::sleep(linger / 2).await;
        assert_eq!(batcher.call(1).await, Some(2));
        assert_eq!(first.await.unwrap(), Some(2));
        // Past the linger, an item goes alone.
        tokio::time::sleep(2 * linger).await;
        assert_eq!(batcher.call(2).await, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_in_a_hurry_ends_the_linger_of_its_batch() {
        let linger = Duration::from_secs(10);
        let batcher = answering_batch_sizes(linger);
        let began = tokio::time::Instant::now();
        // Alone: it goes at once.
        assert_eq!(batcher.call_soon(0).await, Some(1));
        assert_eq!(began.elapsed(), Duration::ZERO);
        // Joining a lingering batch: the batch goes when it arrives, both in it.
        let first = call_in_background(&batcher, 1);
        tokio::time::sleep(linger / 2).await;
        assert_eq!(batcher.call_soon(2).await, Some(2));
        assert_eq!(first.await.unwrap(), Some(2));
        assert_eq!(began.elapsed(), linger / 2);
    }
}
