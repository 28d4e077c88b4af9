//! rayon inside batches: a `run` that fetches a batch (I/O, on the engine's own
//! worker thread) often has a CPU-heavy step per entry after it (decode, hash,
//! parse). [`par_each`] runs that step over the batch on a rayon pool and turns
//! the per-entry results into the [`Outcome`] that retries only the entries that
//! failed.
//!
//! Sizing: `max_concurrency` is the number of batches in flight (I/O slots: size
//! it for the backend); the rayon pool's threads are for cores (rayon's default:
//! one per core). While one batch's entries are on rayon, its worker waits, and
//! other workers can keep fetching.
//!
//! A panic in the closure counts as a failure of that entry alone: it is
//! caught, and the entry is retried with the panic message as its error.

use crate::task::{Outcome, RunError};
use crate::unwind::catch;
use rayon::prelude::*;
use rayon::ThreadPool;

/// Runs `f` on every entry of `batch` on rayon's global pool, then says what
/// to do: [`Outcome::Ok`] when every entry succeeded, else
/// [`Outcome::FailEntries`] with the entries that failed (cloned, in batch
/// order) and the first failure's error (the text says how many failed).
///
/// ```
/// use buffered_task::{par_each, Outcome, Task};
///
/// struct Decode;
/// impl Task for Decode {
///     type Entry = String;
///     type State = ();
///     fn run(&self, raw: &[String], _: &()) -> Outcome<String, ()> {
///         // (fetching the batch would go here, on this worker thread)
///         par_each(raw, |s| s.parse::<u64>().map(drop))
///     }
/// }
/// let batch = vec!["1".to_string(), "x".to_string(), "3".to_string()];
/// match Decode.run(&batch, &()) {
///     Outcome::FailEntries(failed, error) => {
///         assert_eq!(failed, vec!["x".to_string()]);
///         assert!(error.to_string().contains("invalid digit"));
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn par_each<T, S, F, E>(batch: &[T], f: F) -> Outcome<T, S>
where
    T: Clone + Send + Sync,
    F: Fn(&T) -> Result<(), E> + Send + Sync,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    settle(batch, batch.par_iter().map(|e| attempt(&f, e)).collect())
}

/// As [`par_each`], on the given pool rather than rayon's global one.
pub fn par_each_in<T, S, F, E>(pool: &ThreadPool, batch: &[T], f: F) -> Outcome<T, S>
where
    T: Clone + Send + Sync,
    F: Fn(&T) -> Result<(), E> + Send + Sync,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let results = pool.install(|| batch.par_iter().map(|e| attempt(&f, e)).collect());
    settle(batch, results)
}

/// One entry, contained: its error, or its panic as an error.
fn attempt<T, F, E>(f: &F, entry: &T) -> Option<RunError>
where
    F: Fn(&T) -> Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match catch(|| f(entry)) {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(RunError::new(e)),
        Err(msg) => Some(RunError::new(format!("panicked: {msg}"))),
    }
}

fn settle<T: Clone, S>(batch: &[T], results: Vec<Option<RunError>>) -> Outcome<T, S> {
    let mut failed = Vec::new();
    let mut first: Option<RunError> = None;
    for (entry, result) in batch.iter().zip(results) {
        if let Some(error) = result {
            failed.push(entry.clone());
            first.get_or_insert(error);
        }
    }
    match first {
        None => Outcome::Ok,
        Some(error) if failed.len() == 1 => Outcome::FailEntries(failed, error),
        Some(error) => {
            let n = failed.len();
            Outcome::FailEntries(
                failed,
                RunError::new(format!("{n} entries failed; the first: {error}")),
            )
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn failures_and_panics_retry_only_their_entries() {
        let batch: Vec<u32> = (0..100).collect();
        let outcome: Outcome<u32, ()> = par_each(&batch, |&e| {
            if e == 13 {
                panic!("deliberate: unlucky");
            }
            if e % 40 == 0 {
                return Err(format!("{e} is round"));
            }
            Ok(())
        });
        match outcome {
            Outcome::FailEntries(failed, error) => {
                assert_eq!(failed, vec![0, 13, 40, 80]);
                assert!(error
                    .to_string()
                    .starts_with("4 entries failed; the first: 0 is round"));
            }
            other => panic!("{other:?}"),
        }
        let all_ok: Outcome<u32, ()> = par_each(&batch, |_| Ok::<(), String>(()));
        assert_eq!(all_ok, Outcome::Ok);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let on_pool: Outcome<u32, ()> =
            par_each_in(
                &pool,
                &batch,
                |&e| {
                    if e == 7 {
                        Err("seven")
                    } else {
                        Ok(())
                    }
                },
            );
        assert_eq!(
            on_pool,
            Outcome::FailEntries(vec![7], RunError::new("seven"))
        );
    }
}
