//! Fetch a batch (I/O, on the engine's worker), then decode every entry on
//! rayon (CPU), retrying only the entries that fail to decode.
//!
//! `cargo run --release --example rayon_decode`
//!
//! Sizing: `max_concurrency` is how many batches are fetched at once (size it
//! for the backend: the I/O slots); rayon's pool has one thread per core for
//! the decoding. Here 4 fetches are in flight, and while one batch decodes on
//! every core the others keep waiting on "the network".

use buffered_task::{par_each, Builder, Outcome, Priority, Task};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A block header as raw bytes "from the network".
fn fetch(blocks: &[u64]) -> Vec<Vec<u8>> {
    std::thread::sleep(Duration::from_millis(5)); // one round trip per batch
    blocks.iter().map(|b| b.to_le_bytes().repeat(64)).collect()
}

/// Real CPU work: a few rounds of FNV-1a over the bytes.
fn decode(raw: &[u8]) -> Result<u64, String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..40 {
        for &byte in raw {
            h = (h ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
    if h % 97 == 0 {
        Err(format!("checksum {h:x} rejected")) // now and then, a bad block
    } else {
        Ok(h)
    }
}

struct Index {
    decoded: AtomicU64,
}

impl Task for Index {
    type Entry = u64;
    type State = ();
    fn run(&self, blocks: &[u64], _: &()) -> Outcome<u64, ()> {
        let raw = fetch(blocks);
        let by_block: Vec<(u64, &Vec<u8>)> = blocks.iter().copied().zip(&raw).collect();
        let outcome: Outcome<_, ()> = par_each(&by_block, |(_, bytes)| decode(bytes).map(drop));
        // Map the failed (block, bytes) pairs back to the blocks to retry.
        match outcome {
            Outcome::FailEntries(failed, error) => {
                let ok = blocks.len() - failed.len();
                self.decoded.fetch_add(ok as u64, Ordering::Relaxed);
                Outcome::FailEntries(failed.into_iter().map(|(b, _)| b).collect(), error)
            }
            _ => {
                self.decoded
                    .fetch_add(blocks.len() as u64, Ordering::Relaxed);
                Outcome::Ok
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let task = std::sync::Arc::new(Index {
        decoded: AtomicU64::new(0),
    });
    let handle = Builder::new(task.clone(), ())
        .name("decode")
        .max_batch_size(200)
        .max_concurrency(4) // I/O slots
        .flush_interval(Duration::from_millis(20))
        .poll(false)
        .retry_policy(buffered_task::RetryPolicy::new(2).backoff(Duration::ZERO, Duration::ZERO))
        .dead_letter_handler(|blocks, reason| {
            println!("gave up on {} blocks: {reason}", blocks.len())
        })
        .start()?;
    let start = Instant::now();
    handle.buffer((0..20_000).collect(), Priority::Back)?;
    handle.shutdown_drain()?;
    let stats = handle.stats();
    println!(
        "{} blocks decoded in {:.2?} on {} rayon threads ({} retried, {} dead)",
        task.decoded.load(Ordering::Relaxed),
        start.elapsed(),
        buffered_task::rayon::current_num_threads(),
        stats.retried,
        stats.dead_lettered,
    );
    Ok(())
}
