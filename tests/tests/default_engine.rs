//! The default engine of functions that name no `store`: in a test build of their crate
//! (this file's functions), one per tokio runtime, so that tests of one binary keep apart,
//! shared by every task of a runtime and forgotten with it; in a service's build (the
//! `idempotent-tests` library's functions), one per process, shared by every runtime; in
//! either, replaced in a block by `Idempotency::as_default`.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_runtime::{idempotent, Error, Idempotency};

static RUNS: AtomicU32 = AtomicU32::new(0);

/// Answers the value it is given: equal keys with other values tell a replay apart.
#[idempotent(key = id, scope = "default_engine.price")]
async fn price(id: u32, value: u32) -> Result<u32, Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

// Two tests with equal keys and different results: before, one binary shared one engine,
// and whichever ran second got the first's result (`left: 100, right: 250`).
#[tokio::test]
async fn a_test_gets_its_own_result() {
    assert_eq!(price(1, 100).await.unwrap(), 100);
    assert_eq!(
        price(1, 999).await.unwrap(),
        100,
        "a replay within the test"
    );
}

#[tokio::test]
async fn another_test_with_the_same_key_gets_its_own_result_too() {
    assert_eq!(price(1, 250).await.unwrap(), 250);
    assert_eq!(
        price(1, 999).await.unwrap(),
        250,
        "a replay within the test"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tasks_and_threads_of_one_runtime_share_its_engine() {
    let first = tokio::spawn(price(2, 7)).await.unwrap().unwrap();
    let on_other_tasks: Vec<_> = (0..8).map(|_| tokio::spawn(price(2, 8))).collect();
    for task in on_other_tasks {
        assert_eq!(task.await.unwrap().unwrap(), first);
    }
    let engine = idempotent_runtime::__private::default_engine(true);
    assert_eq!(engine.stats().executed, 1);
    assert_eq!(engine.stats().replayed, 8);
}

#[tokio::test]
async fn a_block_runs_with_the_engine_it_is_given() {
    let mine = Idempotency::memory();
    let runtime_default = idempotent_runtime::__private::default_engine(true);
    let v = mine
        .as_default(async {
            let a = price(3, 1).await.unwrap();
            let b = price(3, 2).await.unwrap();
            assert_eq!(
                Idempotency::current_default().stats(),
                mine.stats(),
                "the block's default is the given engine"
            );
            (a, b)
        })
        .await;
    assert_eq!(v, (1, 1));
    assert_eq!((mine.stats().executed, mine.stats().replayed), (1, 1));
    assert_eq!(
        runtime_default.stats().executed,
        0,
        "the runtime's engine saw nothing"
    );
    // Outside the block, the runtime's engine: the key is new there.
    assert_eq!(price(3, 5).await.unwrap(), 5);
}

#[test]
fn a_runtimes_engine_is_forgotten_with_the_runtime() {
    use idempotent_runtime::__private::runtime_has_a_default_engine;
    for flavor in ["current_thread", "multi_thread"] {
        let rt = match flavor {
            "current_thread" => tokio::runtime::Builder::new_current_thread(),
            _ => tokio::runtime::Builder::new_multi_thread(),
        }
        .enable_all()
        .build()
        .unwrap();
        let id = rt.handle().id();
        assert!(!runtime_has_a_default_engine(id));
        rt.block_on(price(4, 1)).unwrap();
        assert!(runtime_has_a_default_engine(id));
        drop(rt);
        assert!(
            !runtime_has_a_default_engine(id),
            "the dropped {flavor} runtime's engine is still kept"
        );
    }
}

#[test]
fn a_service_builds_default_is_shared_by_every_runtime() {
    use idempotent_tests::service_build::{shared_price, SHARED_PRICE_RUNS};
    // As actix-web runs one runtime per worker: duplicates on two must meet.
    let on_a_runtime_of_its_own = |value: u32| {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(shared_price(9, value))
                .unwrap()
        })
        .join()
        .unwrap()
    };
    let first = on_a_runtime_of_its_own(1);
    assert_eq!(on_a_runtime_of_its_own(2), first);
    assert_eq!(SHARED_PRICE_RUNS.load(Ordering::SeqCst), 1);
    assert!(Idempotency::current_default().stats().replayed >= 1);
}

static NESTED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = id, scope = "default_engine.nested")]
async fn nested(id: u32, value: u32) -> Result<u32, Error> {
    NESTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// Its body runs on a task of its own, and calls `nested`.
#[idempotent(key = id, scope = "default_engine.outer", on_cancel = "finish")]
async fn outer_finish(id: u32, value: u32) -> Result<u32, Error> {
    nested(id, value).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_default_goes_with_a_body_run_on_a_task_of_its_own() {
    // An outside review found the body's own calls using the runtime's engine instead,
    // so that `nested` ran a second time.
    let mine = Idempotency::memory();
    let (a, b) = mine
        .as_default(async {
            let a = nested(1001, 1).await.unwrap();
            let b = outer_finish(1001, 2).await.unwrap();
            (a, b)
        })
        .await;
    assert_eq!((a, b), (1, 1), "nested ran again in the finishing body");
    assert_eq!(NESTED_RUNS.load(Ordering::SeqCst), 1);
}
