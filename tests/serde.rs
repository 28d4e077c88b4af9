//! With the `serde` feature: the stats, counts and batch records serialize.
#![cfg(feature = "serde")]

mod common;
use buffered_task::{BatchRecord, Builder, DebugCount, FlushInterval, Outcome, Stats};
use common::*;
use crossbeam_channel::unbounded;

#[test]
fn stats_counts_and_records_round_trip_through_json() {
    let (tx, records) = unbounded::<BatchRecord>();
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .on_batch(move |r| tx.send(r.clone()).unwrap())
        .start()
        .unwrap();
    handle.push_back(vec![1, 2]).unwrap();
    let record = recv(&records);
    let count = handle.debug_count().unwrap();
    handle.shutdown_drain().unwrap();
    let stats = handle.stats();
    let json = serde_json::to_string(&stats).unwrap();
    assert!(json.contains("\"processed\":2"), "{json}");
    assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), stats);
    let json = serde_json::to_string(&count).unwrap();
    assert_eq!(serde_json::from_str::<DebugCount>(&json).unwrap(), count);
    let json = serde_json::to_string(&record).unwrap();
    assert!(json.contains("\"kind\":\"Ok\""), "{json}");
    assert_eq!(serde_json::from_str::<BatchRecord>(&json).unwrap(), record);
}
