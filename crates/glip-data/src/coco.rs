//! COCO detection json: validated, then served as GLIP grounding samples.

use crate::detection::{
    check_box, detection_sample, keep, load_image, missing_files, Object, PromptConfig,
};
use crate::error::{Collector, ErrorPolicy, SkipReport};
use crate::rng::Rng;
use crate::{DataError, Dataset, Sample};
use glip_core::prompt::CaptionTokenizer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An image record.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoImage {
    /// `id`.
    pub id: u64,
    /// `file_name`, relative to the images folder.
    pub file_name: String,
    /// `width`.
    pub width: u32,
    /// `height`.
    pub height: u32,
}

/// A category record.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoCategory {
    /// `id` (arbitrary, not necessarily contiguous).
    pub id: u64,
    /// `name`.
    pub name: String,
}

/// A validated COCO dataset.
pub struct CocoDataset {
    /// The annotation file.
    pub path: PathBuf,
    /// The images folder.
    pub images_dir: PathBuf,
    /// Images in file order.
    pub images: Vec<CocoImage>,
    /// Categories in file order; a sample's labels index this list.
    pub categories: Vec<CocoCategory>,
    /// Objects of each image (same order as `images`).
    pub objects: Vec<Vec<Object>>,
    /// What was skipped under [`ErrorPolicy::Skip`].
    pub report: SkipReport,
    /// Prompt construction.
    pub prompt: PromptConfig,
    tokenizer: Option<Arc<dyn CaptionTokenizer>>,
    names: Vec<String>,
}

impl std::fmt::Debug for CocoDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CocoDataset")
            .field("path", &self.path)
            .field("images", &self.images.len())
            .field("categories", &self.categories.len())
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
    serde_json::from_str(&text).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        line: Some(e.line()),
        msg: e.to_string(),
    })
}

fn array<'a>(
    root: &'a Value,
    key: &str,
    path: &Path,
    required: bool,
) -> Result<&'a [Value], DataError> {
    match root.get(key) {
        Some(Value::Array(a)) => Ok(a),
        None if !required => Ok(&[]),
        _ => Err(DataError::Record {
            file: path.to_path_buf(),
            record: "top level".into(),
            problem: format!("`{key}` must be an array"),
        }),
    }
}

fn uint(v: &Value, key: &str) -> Result<u64, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("missing or invalid `{key}` (a non-negative integer)"))
}

impl CocoDataset {
    /// Reads and validates `path`. Under `Fail` the first invalid record (or every one, when
    /// there are several) is an error; under `Skip` they are left out and listed in `report`.
    /// Images are checked for existence in `images_dir` only by [`CocoDataset::check_images`].
    pub fn open(path: &Path, images_dir: &Path, policy: ErrorPolicy) -> Result<Self, DataError> {
        let root = read_json(path)?;
        let mut c = Collector::default();
        let mut categories = Vec::new();
        let mut cat_index: HashMap<u64, usize> = HashMap::new();
        for (i, v) in array(&root, "categories", path, true)?.iter().enumerate() {
            let rec = || format!("categories[{i}]");
            let id = match uint(v, "id") {
                Ok(id) => id,
                Err(e) => {
                    c.push(path, rec(), e);
                    continue;
                }
            };
            let rec = || format!("category id {id}");
            let name = v.get("name").and_then(Value::as_str).unwrap_or("").trim().to_string();
            if name.is_empty() {
                c.push(path, rec(), "empty category name");
            } else if let std::collections::hash_map::Entry::Vacant(e) = cat_index.entry(id) {
                e.insert(categories.len());
                categories.push(CocoCategory { id, name });
            } else {
                c.push(path, rec(), "duplicate category id");
            }
        }
        let mut images = Vec::new();
        let mut img_index: HashMap<u64, usize> = HashMap::new();
        for (i, v) in array(&root, "images", path, true)?.iter().enumerate() {
            let parsed = (|| -> Result<CocoImage, String> {
                let id = uint(v, "id")?;
                let file_name = v
                    .get("file_name")
                    .and_then(Value::as_str)
                    .ok_or("missing `file_name`")?
                    .to_string();
                let width = uint(v, "width")? as u32;
                let height = uint(v, "height")? as u32;
                if width == 0 || height == 0 {
                    return Err(format!("image size {width}x{height} is empty"));
                }
                Ok(CocoImage { id, file_name, width, height })
            })();
            match parsed {
                Err(e) => c.push(path, format!("images[{i}]"), e),
                Ok(im) if img_index.contains_key(&im.id) => {
                    c.push(path, format!("image id {}", im.id), "duplicate image id")
                }
                Ok(im) => {
                    img_index.insert(im.id, images.len());
                    images.push(im);
                }
            }
        }
        let mut objects = vec![Vec::new(); images.len()];
        let mut ann_ids = std::collections::HashSet::new();
        for (i, v) in array(&root, "annotations", path, false)?.iter().enumerate() {
            let rec = match v.get("id").and_then(Value::as_u64) {
                Some(id) => format!("annotation id {id}"),
                None => format!("annotations[{i}]"),
            };
            let parsed = (|| -> Result<(usize, Object), String> {
                let id = uint(v, "id")?;
                if !ann_ids.insert(id) {
                    return Err("duplicate annotation id".into());
                }
                let image_id = uint(v, "image_id")?;
                let &im = img_index.get(&image_id).ok_or(format!("unknown image id {image_id}"))?;
                let cat = uint(v, "category_id")?;
                let &ci = cat_index.get(&cat).ok_or(format!("unknown category id {cat}"))?;
                let b = v.get("bbox").and_then(Value::as_array).ok_or("missing `bbox`")?;
                let b: Vec<f64> = b.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect();
                if b.len() != 4 {
                    return Err(format!("bbox has {} numbers, expected 4 (x, y, w, h)", b.len()));
                }
                let crowd = v.get("iscrowd").and_then(Value::as_u64).unwrap_or(0) != 0;
                let (w, h) = (images[im].width as f64, images[im].height as f64);
                let bbox = check_box([b[0], b[1], b[0] + b[2], b[1] + b[3]], w, h)?;
                Ok((im, Object { bbox, category: ci, crowd }))
            })();
            match parsed {
                Ok((im, o)) => objects[im].push(o),
                Err(e) => c.push(path, rec, e),
            }
        }
        let report = c.finish(path, policy)?;
        let names = categories.iter().map(|c| c.name.clone()).collect();
        Ok(Self {
            path: path.to_path_buf(),
            images_dir: images_dir.to_path_buf(),
            images,
            categories,
            objects,
            report,
            prompt: PromptConfig::default(),
            tokenizer: None,
            names,
        })
    }

    /// Holds out the categories named `held_out` (an open-vocabulary split: base categories to
    /// train on, novel ones to find at evaluation): their objects leave the training targets
    /// and their names the prompts, positive and negative alike, so that training never reads
    /// them. A name that is not a category of the file is an error listing its categories.
    pub fn without_categories(self, held_out: &[String]) -> Result<Self, DataError> {
        crate::detection::check_held_out(&self.path, "categories", &self.names, held_out)?;
        Ok(self.without_any_of(held_out))
    }

    /// [`CocoDataset::without_categories`] of those of `held_out` the file has (a source mixed
    /// into a run's training data leaves out what the run holds out, whichever it names).
    pub fn without_any_of(mut self, held_out: &[String]) -> Self {
        if held_out.is_empty() {
            return self;
        }
        let new_index =
            crate::detection::keep_categories(&mut self.categories, |c| &c.name, held_out);
        self.names = self.categories.iter().map(|c| c.name.clone()).collect();
        for objects in &mut self.objects {
            crate::detection::renumber(objects, &new_index);
        }
        self
    }

    /// Sets the prompt construction and the tokenizer whose budget prompts must fit.
    pub fn with_prompts(
        mut self,
        prompt: PromptConfig,
        tokenizer: Option<Arc<dyn CaptionTokenizer>>,
    ) -> Self {
        self.prompt = prompt;
        self.tokenizer = tokenizer;
        self
    }

    /// Looks for every image file (a `stat` each, in parallel; nothing is decoded),
    /// so that a missing one stops a run before it trains, not when a batch first needs it.
    /// Under [`ErrorPolicy::Fail`] missing files are an error naming each; under `Skip` their
    /// images are left out and added to [`CocoDataset::report`].
    pub fn without_missing_files(mut self, policy: ErrorPolicy) -> Result<Self, DataError> {
        let names: Vec<&str> = self.images.iter().map(|im| im.file_name.as_str()).collect();
        let images = &self.images;
        let record = |i: usize| format!("image id {} ({})", images[i].id, images[i].file_name);
        let (problems, missing) =
            missing_files(&self.path, &self.images_dir, &names, record, policy)?;
        let (images, objects) =
            (std::mem::take(&mut self.images), std::mem::take(&mut self.objects));
        (self.images, self.objects) = keep(images, objects, &missing);
        self.report.problems.extend(problems);
        Ok(self)
    }

    /// Every image file that is missing or does not decode, as problems.
    pub fn check_images(&self) -> Vec<crate::Problem> {
        use rayon::prelude::*;
        self.images
            .par_iter()
            .filter_map(|im| {
                let p = self.images_dir.join(&im.file_name);
                match load_image(&p) {
                    Ok(img) if img.dimensions() != (im.width, im.height) => Some(crate::Problem {
                        file: self.path.clone(),
                        record: format!("image id {} ({})", im.id, im.file_name),
                        problem: format!(
                            "file is {}x{}, the record says {}x{}",
                            img.width(),
                            img.height(),
                            im.width,
                            im.height
                        ),
                    }),
                    Ok(_) => None,
                    Err(e) => Some(crate::Problem {
                        file: self.path.clone(),
                        record: format!("image id {} ({})", im.id, im.file_name),
                        problem: e.to_string(),
                    }),
                }
            })
            .collect()
    }
}

impl Dataset for CocoDataset {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn categories(&self) -> &[String] {
        &self.names
    }

    fn get(&self, index: usize, rng: &mut Rng) -> Result<Sample, DataError> {
        let im = &self.images[index];
        let image = load_image(&self.images_dir.join(&im.file_name))?;
        let record = || format!("{}: image id {} ({})", self.path.display(), im.id, im.file_name);
        detection_sample(
            image,
            im.id,
            &self.objects[index],
            &self.names,
            &self.prompt,
            self.tokenizer.as_ref(),
            rng,
            &record,
        )
    }
}
