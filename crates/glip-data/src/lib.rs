//! Data of glip-rs: COCO and ODVG readers, the embedded synthetic `shapes` task, transforms
//! and batching into [`glip_core::ImageBatch`], [`glip_core::TextBatch`] and
//! [`glip_core::Target`].
//!
//! # Owns
//! Files (or a generator) to batches, and validating them with errors that name the file and
//! the record. Bad input never panics and never passes silently: under [`ErrorPolicy::Fail`]
//! (the default) it is an error, under [`ErrorPolicy::Skip`] it is left out and counted.
//!
//! # Must not know about
//! Models, losses, optimisers. Tokenisation comes in through
//! [`glip_core::prompt::CaptionTokenizer`].
//!
//! ```
//! use glip_data::{rng::Rng, Dataset, ShapesConfig, ShapesDataset, Split};
//!
//! let train = ShapesDataset::new(ShapesConfig::default(), Split::Train).unwrap();
//! assert_eq!(train.categories().len(), 20);
//! assert_eq!(train.categories()[0], "red circle");
//! let s = train.get(0, &mut Rng::new(0)).unwrap();
//! assert!(!s.boxes.is_empty() && s.caption.ends_with('.'));
//! // Deterministic: the same image every time.
//! assert_eq!(train.render(5).0, train.render(5).0);
//! ```

pub mod coco;
pub mod concat;
pub mod detection;
pub mod error;
pub mod loader;
pub mod odvg;
pub use glip_core::rng;
pub mod sample;
pub mod shapes;
pub mod transforms;

pub use coco::CocoDataset;
pub use concat::Concat;
pub use detection::PromptConfig;
pub use error::{DataError, ErrorPolicy, Problem, SkipReport};
pub use loader::Loader;
pub use odvg::OdvgDataset;
pub use sample::{collate, Batch, Sample};
pub use shapes::{write_atomic, ShapesConfig, ShapesDataset, Split};
pub use transforms::TransformConfig;

/// A source of grounding samples.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there is none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Category names; sample labels index this list.
    fn categories(&self) -> &[String];
    /// Sample `index`; `rng` drives the prompt's negatives and order.
    fn get(&self, index: usize, rng: &mut rng::Rng) -> Result<Sample, DataError>;
}
