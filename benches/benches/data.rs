//! Loader throughput: the synthetic shapes task, and a folder of JPEGs read as COCO.
//! Each iteration makes one batch of 16 (decode or render, transforms, normalise, pad,
//! tokenise). `cargo bench -p glip-benches --bench data`.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glip_data::{
    CocoDataset, ErrorPolicy, Loader, ShapesConfig, ShapesDataset, Split, TransformConfig,
};
use std::sync::Arc;

fn tokenizer() -> Arc<glip_text::Tokenizer> {
    let p = glip_testing::fixture("bert-tiny/tokenizer.json");
    Arc::new(glip_text::Tokenizer::from_file(&p).unwrap())
}

fn loaders(c: &mut Criterion) {
    let tok = tokenizer();
    let shapes = Arc::new(
        ShapesDataset::new(ShapesConfig { train_images: 256, ..Default::default() }, Split::Train)
            .unwrap(),
    );
    // A folder of 256 JPEGs (640x480, the shapes images upscaled) with COCO annotations.
    let dir = std::env::temp_dir().join("glip-bench-jpegs");
    if !dir.join("annotations.json").exists() {
        let big = ShapesDataset::new(
            ShapesConfig { train_images: 256, image_size: 480, ..Default::default() },
            Split::Train,
        )
        .unwrap();
        big.export_coco(&dir).unwrap();
        let ann =
            std::fs::read_to_string(dir.join("annotations.json")).unwrap().replace(".png", ".jpg");
        for i in 0..256 {
            let png = dir.join(format!("images/{i:06}.png"));
            let img = image::open(&png)
                .unwrap()
                .resize_exact(640, 480, image::imageops::FilterType::Triangle)
                .to_rgb8();
            img.save(dir.join(format!("images/{i:06}.jpg"))).unwrap();
            std::fs::remove_file(png).unwrap();
        }
        // Boxes were made for 480x480; the files are 640x480: rescale x.
        let mut v: serde_json::Value = serde_json::from_str(&ann).unwrap();
        for im in v["images"].as_array_mut().unwrap() {
            im["width"] = 640.into();
        }
        for a in v["annotations"].as_array_mut().unwrap() {
            let b = a["bbox"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>();
            a["bbox"] = serde_json::json!([b[0] * 640.0 / 480.0, b[1], b[2] * 640.0 / 480.0, b[3]]);
        }
        std::fs::write(dir.join("annotations.json"), v.to_string()).unwrap();
    }
    let coco = Arc::new(
        CocoDataset::open(&dir.join("annotations.json"), &dir.join("images"), ErrorPolicy::Fail)
            .unwrap(),
    );
    let mut g = c.benchmark_group("loader_batch16");
    g.sample_size(10);
    g.throughput(Throughput::Elements(16));
    let mut l = Loader::new(shapes, tok.clone(), 16, Device::Cpu);
    l.transforms = TransformConfig { hflip: 0.5, ..Default::default() };
    let mut e = 0u64;
    g.bench_function("shapes_128px", |b| {
        b.iter(|| {
            e += 1;
            l.batch(e, (e % 16) as usize).unwrap()
        })
    });
    let mut l = Loader::new(coco, tok, 16, Device::Cpu);
    l.transforms =
        TransformConfig { shorter_side: vec![384], max_size: 640, hflip: 0.5, crop: 0.0 };
    g.bench_function("coco_jpeg_640x480_to_384", |b| {
        b.iter(|| {
            e += 1;
            l.batch(e, (e % 16) as usize).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, loaders);
criterion_main!(benches);
