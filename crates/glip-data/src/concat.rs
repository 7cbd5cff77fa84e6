//! Several datasets as one: GLIP trains on detection and grounding data at once (its O365 and
//! GoldG), and a small source may be seen more often than once a pass (`repeat`), as
//! mmdetection's `ConcatDataset` of `RepeatDataset`s.
//!
//! Written here rather than taken from a crate: it is a few lines of index arithmetic over this
//! crate's own [`Dataset`] trait.

use crate::{rng::Rng, DataError, Dataset, Sample};
use std::sync::Arc;

/// The samples of each part in turn, each part's `repeat` times over; the categories are the
/// parts' names in order of first appearance, each sample's labels renumbered into them (a
/// category two parts share by name is one category).
pub struct Concat {
    parts: Vec<Part>,
    categories: Vec<String>,
    len: usize,
}

impl std::fmt::Debug for Concat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<usize> = self.parts.iter().map(|p| p.ds.len()).collect();
        f.debug_struct("Concat")
            .field("len", &self.len)
            .field("part_lens", &parts)
            .field("categories", &self.categories.len())
            .finish()
    }
}

struct Part {
    ds: Arc<dyn Dataset>,
    /// The first index of this part in the concatenation.
    start: usize,
    /// The part's label -> the concatenation's.
    labels: Vec<u32>,
}

impl Concat {
    /// The parts with how often each is repeated. A repeat of 0, an empty part or a length
    /// past `usize` is an error naming the part (by its position, from 0).
    pub fn new(parts: Vec<(Arc<dyn Dataset>, usize)>) -> Result<Self, DataError> {
        let bad = |i: usize, problem: String| problem_at(format!("source {i}"), problem);
        let mut categories: Vec<String> = Vec::new();
        let mut out = Vec::with_capacity(parts.len());
        let mut len = 0usize;
        for (i, (ds, repeat)) in parts.into_iter().enumerate() {
            if repeat == 0 {
                return Err(bad(i, "repeat = 0: a source must be seen at least once".into()));
            }
            if ds.is_empty() {
                return Err(bad(i, "holds no sample".into()));
            }
            let labels = ds
                .categories()
                .iter()
                .map(|name| {
                    let at = categories.iter().position(|c| c == name).unwrap_or_else(|| {
                        categories.push(name.clone());
                        categories.len() - 1
                    });
                    at as u32
                })
                .collect();
            let start = len;
            len =
                ds.len().checked_mul(repeat).and_then(|n| n.checked_add(len)).ok_or_else(|| {
                    bad(i, format!("{} samples x repeat {repeat}: too many", ds.len()))
                })?;
            out.push(Part { ds, start, labels });
        }
        Ok(Self { parts: out, categories, len })
    }

    /// The part of `index` and the index within it.
    fn locate(&self, index: usize) -> Option<(&Part, usize)> {
        if index >= self.len {
            return None;
        }
        let k = self.parts.partition_point(|p| p.start <= index) - 1;
        let p = &self.parts[k];
        Some((p, (index - p.start) % p.ds.len()))
    }
}

impl Dataset for Concat {
    fn len(&self) -> usize {
        self.len
    }

    fn categories(&self) -> &[String] {
        &self.categories
    }

    fn get(&self, index: usize, rng: &mut Rng) -> Result<Sample, DataError> {
        let at = || format!("sample {index}");
        let (part, i) = self
            .locate(index)
            .ok_or_else(|| problem_at(at(), format!("past the end ({} samples)", self.len)))?;
        let mut s = part.ds.get(i, rng)?;
        for l in s.labels.iter_mut().flatten() {
            *l = *part.labels.get(*l as usize).ok_or_else(|| {
                problem_at(at(), format!("label {l} is not one of its source's categories"))
            })?;
        }
        Ok(s)
    }
}

/// A problem of the concatenation's `record` (a source, a sample).
fn problem_at(record: String, problem: String) -> DataError {
    DataError::Record { file: "<training data>".into(), record, problem }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;
    use proptest::prelude::{prop, prop_assert_eq, proptest};

    /// `n` samples whose image id is `id0 + i` and whose one box is labelled `i % categories`.
    struct Fake {
        id0: u64,
        n: usize,
        names: Vec<String>,
    }

    impl Dataset for Fake {
        fn len(&self) -> usize {
            self.n
        }
        fn categories(&self) -> &[String] {
            &self.names
        }
        fn get(&self, index: usize, _rng: &mut Rng) -> Result<Sample, DataError> {
            assert!(index < self.n, "index {index} of {}", self.n);
            Ok(Sample {
                image: RgbImage::new(1, 1),
                image_id: self.id0 + index as u64,
                orig_size: (1, 1),
                caption: String::new(),
                boxes: vec![[0.0, 0.0, 1.0, 1.0]],
                phrases: vec![vec![(0, 0)]],
                labels: vec![Some((index % self.names.len()) as u32)],
            })
        }
    }

    fn fake(id0: u64, n: usize, names: &[&str]) -> Arc<dyn Dataset> {
        Arc::new(Fake { id0, n, names: names.iter().map(|s| s.to_string()).collect() })
    }

    /// Every part's samples appear `repeat` times, in order, and a label names the same
    /// category in the concatenation as in its part.
    #[test]
    fn parts_in_turn_repeated_with_labels_by_name() {
        let a = fake(0, 3, &["cat", "dog"]);
        let b = fake(100, 2, &["dog", "cow"]);
        let c = Concat::new(vec![(a.clone(), 1), (b.clone(), 2)]).unwrap();
        assert_eq!(c.len(), 7);
        assert_eq!(c.categories(), ["cat", "dog", "cow"]);
        let mut rng = Rng::new(0);
        let ids: Vec<u64> = (0..7).map(|i| c.get(i, &mut rng).unwrap().image_id).collect();
        assert_eq!(ids, [0, 1, 2, 100, 101, 100, 101]);
        for i in 0..7 {
            let s = c.get(i, &mut rng).unwrap();
            let (part, j) = if i < 3 { (&a, i) } else { (&b, (i - 3) % 2) };
            let own = part.get(j, &mut rng).unwrap().labels[0].unwrap() as usize;
            let label = s.labels[0].unwrap() as usize;
            assert_eq!(c.categories()[label], part.categories()[own], "sample {i}");
        }
        assert!(c.get(7, &mut rng).is_err());
    }

    #[test]
    fn a_repeat_of_zero_or_an_empty_part_is_an_error_naming_it() {
        let e = Concat::new(vec![(fake(0, 2, &["a"]), 1), (fake(0, 2, &["a"]), 0)]);
        assert!(e.err().unwrap().to_string().contains("source 1: repeat = 0"));
        let e = Concat::new(vec![(fake(0, 0, &["a"]), 1)]);
        assert!(e.err().unwrap().to_string().contains("source 0: holds no sample"));
        let e = Concat::new(vec![(fake(0, 2, &["a"]), usize::MAX)]);
        assert!(e.err().unwrap().to_string().contains("too many"));
    }

    proptest! {
        /// Over any parts and repeats, each part's index `j` appears exactly `repeat` times.
        #[test]
        fn each_sample_appears_repeat_times(parts in prop::collection::vec((1usize..6, 1usize..4), 1..5)) {
            let sets: Vec<(Arc<dyn Dataset>, usize)> = parts
                .iter()
                .enumerate()
                .map(|(k, &(n, r))| (fake(1000 * k as u64, n, &["x"]), r))
                .collect();
            let c = Concat::new(sets).unwrap();
            prop_assert_eq!(c.len(), parts.iter().map(|&(n, r)| n * r).sum::<usize>());
            let mut seen = std::collections::BTreeMap::new();
            let mut rng = Rng::new(0);
            for i in 0..c.len() {
                *seen.entry(c.get(i, &mut rng).unwrap().image_id).or_insert(0usize) += 1;
            }
            for (k, &(n, r)) in parts.iter().enumerate() {
                for j in 0..n {
                    prop_assert_eq!(seen.get(&(1000 * k as u64 + j as u64)).copied(), Some(r));
                }
            }
        }
    }
}
