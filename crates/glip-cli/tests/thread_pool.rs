//! `glip_cli::join_thread_pool`, in a process of its own: rayon's global pool is made once per
//! process, so this file holds a single test.

use rayon::prelude::*;

/// The thread that calls it becomes worker 0 of a global pool of `RAYON_NUM_THREADS` threads,
/// and parallel work started from it still covers every item once.
#[test]
fn the_calling_thread_becomes_worker_zero_of_the_global_pool() {
    std::env::set_var("RAYON_NUM_THREADS", "3");
    assert_eq!(rayon::current_thread_index(), None, "a test thread is outside any pool");
    glip_cli::join_thread_pool();
    assert_eq!(rayon::current_thread_index(), Some(0));
    assert_eq!(rayon::current_num_threads(), 3);
    let n = 1usize << 20;
    let sum: usize = (0..n).into_par_iter().with_min_len(1 << 10).sum();
    assert_eq!(sum, n * (n - 1) / 2);
    // Work handed to the pool from another thread (the data loader's) runs on the other workers
    // while this one waits on it, as the training loop waits on the loader's channel.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            let picked: Vec<Option<usize>> =
                (0..8).into_par_iter().map(|_| rayon::current_thread_index()).collect();
            tx.send(picked).unwrap();
        });
        let picked = rx.recv().unwrap();
        assert!(picked.iter().all(|w| matches!(w, Some(1 | 2))), "{picked:?}");
    });
}
