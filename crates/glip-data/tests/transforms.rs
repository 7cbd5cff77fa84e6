//! Transform properties on the shapes task: boxes stay inside the image and on the pixels of
//! their object; flipping twice is the identity; resizing scales boxes by the pixel factors;
//! the loader is identical whatever the thread count.

use glip_data::rng::Rng;
use glip_data::shapes::{ShapesConfig, ShapesDataset, Split};
use glip_data::transforms::{hflip, random_crop, resize, swap_left_right, TransformConfig};
use glip_data::{Dataset, Sample};
use proptest::prelude::*;

fn one_object_task(seed: u64) -> ShapesDataset {
    let cfg =
        ShapesConfig { max_objects: 1, noise: 0.0, seed, image_size: 64, ..Default::default() };
    ShapesDataset::new(cfg, Split::Train).unwrap()
}

/// Extent of the pixels that differ from the (flat) background by more than `thr`.
fn object_extent(s: &Sample, thr: i32) -> [f32; 4] {
    let bg = s.image.get_pixel(0, 0).0;
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in s.image.enumerate_pixels() {
        let d: i32 = (0..3).map(|c| (p.0[c] as i32 - bg[c] as i32).abs()).max().unwrap();
        if d > thr {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    [x0 as f32, y0 as f32, x1 as f32, y1 as f32]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn transformed_boxes_stay_on_their_pixels(seed in 0u64..10_000, short in 40u32..120, hflip_p in 0.0f32..1.0, crop in 0.0f32..1.0) {
        let ds = one_object_task(seed);
        let t = TransformConfig { shorter_side: vec![short], max_size: 200, hflip: hflip_p, crop };
        let mut rng = Rng::new(seed);
        let s = t.apply(ds.get(0, &mut rng).unwrap(), &mut rng);
        let (w, h) = s.image.dimensions();
        prop_assert_eq!(s.boxes.len(), 1);
        let b = s.boxes[0];
        prop_assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w as f32 && b[3] <= h as f32 && b[0] < b[2] && b[1] < b[3]);
        // The object's pixels lie at the box, within 1.5 source pixels (rasterisation and the
        // resize filter's blur), scaled.
        let e = object_extent(&s, 60);
        let tol = 1.5 * (w as f32 / 64.0).max(1.0) + 1.0;
        for k in 0..4 {
            prop_assert!((e[k] - b[k]).abs() <= tol, "box {:?} vs pixels {:?}", b, e);
        }
    }

    #[test]
    fn flipping_twice_is_the_identity(seed in 0u64..10_000, caption in "(a|the|left|right|Left|leftover|bright| |\\.)*") {
        let ds = one_object_task(seed);
        let mut s = ds.get(0, &mut Rng::new(seed)).unwrap();
        let n = caption.chars().count();
        s.caption = caption.clone();
        s.phrases = vec![vec![(0, n)]];
        let twice = hflip(hflip(s.clone()));
        prop_assert_eq!(&twice.image, &s.image);
        for (a, b) in twice.boxes.iter().zip(&s.boxes) {
            prop_assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4), "{:?} vs {:?}", a, b);
        }
        prop_assert_eq!(&twice.caption, &s.caption);
        prop_assert_eq!(&twice.phrases, &s.phrases);
    }

    #[test]
    fn resize_scales_boxes_by_the_pixel_factors(seed in 0u64..10_000, short in 20u32..200) {
        let ds = one_object_task(seed);
        let s = ds.get(0, &mut Rng::new(seed)).unwrap();
        let (w, h) = s.image.dimensions();
        let r = resize(s.clone(), short, 0);
        let (nw, nh) = r.image.dimensions();
        let (fx, fy) = (nw as f32 / w as f32, nh as f32 / h as f32);
        let (a, b) = (s.boxes[0], r.boxes[0]);
        for (k, f) in [fx, fy, fx, fy].into_iter().enumerate() {
            prop_assert!((a[k] * f - b[k]).abs() < 1e-4);
        }
    }

    #[test]
    fn crops_keep_every_box_whole(seed in 0u64..10_000) {
        let ds = ShapesDataset::new(ShapesConfig { seed, ..Default::default() }, Split::Train).unwrap();
        let s = ds.get(0, &mut Rng::new(seed)).unwrap();
        let c = random_crop(s.clone(), &mut Rng::new(seed + 1));
        for (a, b) in s.boxes.iter().zip(&c.boxes) {
            // Same size: nothing was cut off.
            prop_assert!(((a[2] - a[0]) - (b[2] - b[0])).abs() < 1.0 + 1e-3 && ((a[3] - a[1]) - (b[3] - b[1])).abs() < 1.0 + 1e-3, "{:?} -> {:?}", a, b);
        }
    }
}

#[test]
fn left_and_right_swap_as_whole_words_and_spans_follow() {
    let (c, map) = swap_left_right("the left cube, Right of a leftover bright ball");
    assert_eq!(c, "the right cube, Left of a leftover bright ball");
    // "cube" was at [9, 13), now at [10, 14).
    assert_eq!((map[9], map[13]), (10, 14));
    // "left" [4, 8) became "right" [4, 9).
    assert_eq!((map[4], map[8]), (4, 9));
}

/// Word-level ids for the loader tests.
struct WordTok;
impl glip_core::prompt::CaptionTokenizer for WordTok {
    fn encode_caption(&self, c: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), String> {
        let mut ids = vec![1];
        let mut offs = vec![(0, 0)];
        let mut start = None;
        for (i, ch) in c.chars().chain(std::iter::once(' ')).enumerate() {
            match (ch.is_alphanumeric(), start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    ids.push(10 + (i - s) as u32);
                    offs.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        ids.push(2);
        offs.push((0, 0));
        Ok((ids, offs))
    }
    fn count_tokens(&self, c: &str) -> Result<usize, String> {
        Ok(self.encode_caption(c)?.0.len())
    }
    fn token_budget(&self) -> usize {
        256
    }
}

#[test]
fn loader_batches_are_identical_whatever_the_thread_count() {
    use glip_data::Loader;
    use std::sync::Arc;
    let ds = Arc::new(
        ShapesDataset::new(ShapesConfig { train_images: 16, ..Default::default() }, Split::Train)
            .unwrap(),
    );
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut l = Loader::new(ds.clone(), Arc::new(WordTok), 5, candle_core::Device::Cpu);
            l.transforms = TransformConfig {
                shorter_side: vec![96, 112],
                max_size: 160,
                hflip: 0.5,
                crop: 0.5,
            };
            l.shuffle = true;
            l.seed = 7;
            let b = l.batch(3, 1).unwrap();
            (
                b.images.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.text.captions.clone(),
                b.targets
                    .iter()
                    .map(|t| t.boxes.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect::<Vec<_>>(),
            )
        })
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(1), run(4));
}

/// With batches made ahead on a worker thread, every step gets the batch it would have got
/// without (steps 2..11 cross an epoch boundary: 4 batches an epoch), and stopping early stops.
#[test]
fn prefetched_batches_are_the_batches_of_their_steps() {
    use glip_data::Loader;
    use std::sync::Arc;
    let ds = Arc::new(
        ShapesDataset::new(ShapesConfig { train_images: 16, ..Default::default() }, Split::Train)
            .unwrap(),
    );
    let collect = |prefetch: usize, stop_after: usize| {
        let mut l = Loader::new(ds.clone(), Arc::new(WordTok), 5, candle_core::Device::Cpu);
        l.shuffle = true;
        l.seed = 3;
        l.transforms.hflip = 0.5;
        l.prefetch = prefetch;
        let mut seen = Vec::new();
        l.for_steps(2, 11, |s, b| -> Result<bool, glip_data::DataError> {
            let pixels = b.images.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            seen.push((s, b.text.captions.clone(), pixels));
            Ok(seen.len() < stop_after)
        })
        .unwrap();
        seen
    };
    let plain = collect(0, usize::MAX);
    assert_eq!(plain.iter().map(|x| x.0).collect::<Vec<_>>(), (2..11).collect::<Vec<_>>());
    assert_eq!(collect(3, usize::MAX), plain);
    assert_eq!(collect(1, usize::MAX), plain);
    let stopped = collect(3, 4);
    assert_eq!(stopped.len(), 4);
    assert_eq!(stopped[..], plain[..4]);
}

/// A loader over no sample (an empty training set reached candle with a batch of 0 images and
/// panicked there) is an error that says so.
#[test]
fn batching_no_sample_is_an_error() {
    use glip_data::Loader;
    use std::sync::Arc;
    let ds = Arc::new(
        ShapesDataset::new(ShapesConfig { train_images: 0, ..Default::default() }, Split::Train)
            .unwrap(),
    );
    let loader = Loader::new(ds, Arc::new(WordTok), 4, candle_core::Device::Cpu);
    let err = loader.step_batch(0).unwrap_err().to_string();
    assert!(err.contains("no samples to batch"), "{err}");
    let err = glip_data::collate(&[], &WordTok, &candle_core::Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("no samples"), "{err}");
}

/// Sharded for data parallelism, the ranks' batches of a step are consecutive parts of one
/// global batch: with 2 ranks of 3 images, rank r's batch b holds the samples of batch `2b + r`
/// of one loader of 3 (same seed, same order, same transforms); an epoch has
/// `len / (world * batch)` steps; bad shards are errors that say why.
#[test]
fn sharded_loaders_split_each_global_batch_between_ranks() {
    use glip_data::Loader;
    use std::sync::Arc;
    let ds = Arc::new(
        ShapesDataset::new(ShapesConfig { train_images: 14, ..Default::default() }, Split::Train)
            .unwrap(),
    );
    let make = || {
        let mut l = Loader::new(ds.clone(), Arc::new(WordTok), 3, candle_core::Device::Cpu);
        l.shuffle = true;
        l.seed = 5;
        l.transforms.hflip = 0.5;
        l
    };
    let ids = |s: Vec<glip_data::Sample>| s.iter().map(|s| s.image_id).collect::<Vec<_>>();
    let one = make();
    let ranks = [make().sharded(0, 2).unwrap(), make().sharded(1, 2).unwrap()];
    assert_eq!(one.num_batches(), 5);
    assert_eq!(ranks[0].num_batches(), 2, "14 / (2 x 3): the last 2 samples left out");
    for epoch in 0..2 {
        for b in 0..2 {
            for (r, l) in ranks.iter().enumerate() {
                let got = l.samples(epoch, b).unwrap();
                let want = one.samples(epoch, 2 * b + r).unwrap();
                assert_eq!(got.len(), 3);
                assert_eq!(ids(got.clone()), ids(want.clone()), "epoch {epoch} batch {b} rank {r}");
                assert_eq!(got[0].image.as_raw(), want[0].image.as_raw(), "same transforms");
            }
        }
    }
    for (rank, world) in [(2, 2), (0, 0)] {
        let err = make().sharded(rank, world).unwrap_err().to_string();
        assert!(err.contains(&format!("shard {rank} of {world}")), "{err}");
    }
    let err = make().sharded(0, 5).unwrap_err().to_string();
    assert!(err.contains("at least one global batch") && err.contains("has 14"), "{err}");
}
