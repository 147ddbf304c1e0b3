//! Driving a future while a set of others keeps going; handing a
//! subscription's messages to their owner in batches.

use std::{future::Future, sync::Weak};

use async_nats::{Message, Subscriber};
use futures::{StreamExt, stream::FuturesUnordered};

/// Most messages handed over at once by [`in_batches`].
const BATCH: usize = 64;

/// Hands the messages of `sub` to `each`, every batch that is ready at once
/// (up to 64) in one call, so the owner takes its lock once per batch. Ends
/// when the subscription does or the owner is dropped.
pub async fn in_batches<T>(owner: Weak<T>, sub: Subscriber, mut each: impl FnMut(&T, Vec<Message>)) {
    let mut batches = sub.ready_chunks(BATCH);
    while let Some(batch) = batches.next().await {
        let Some(owner) = owner.upgrade() else { return };
        each(&owner, batch);
    }
}

/// Runs `fut` to completion while polling `others`, handing each of their
/// outputs to `done` as it comes. A task that keeps futures in a
/// `FuturesUnordered` and then awaits something else must not let them
/// stall meanwhile: they may hold what that something waits for (the
/// presence writer's JetStream ack permits), or work that should go on (the
/// notifier's batches in hand while its pull is set up again).
pub async fn alongside<T, F: Future>(
    fut: impl Future<Output = T>,
    others: &mut FuturesUnordered<F>,
    mut done: impl FnMut(F::Output),
) -> T {
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            Some(o) = others.next(), if !others.is_empty() => done(o),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_others_run_while_the_future_waits_on_them() {
        let mut others = FuturesUnordered::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        others.push(async move {
            let _ = tx.send(7);
            1u32
        });
        let mut seen = Vec::new();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), alongside(rx, &mut others, |o| seen.push(o)))
            .await
            .expect("the other future ran, so the awaited one completed");
        assert_eq!(got.unwrap(), 7);
        assert_eq!(seen, [1]);
        assert!(others.is_empty());
    }
}
