//! Models from TOML configs: built-in components by name, unknown keys rejected, and a
//! researcher's own query generator plugged in without editing any enum of the workspace.

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use glip_core::{ImageBatch, Queries, QueryGenerator, QueryInputs, TextBatch};
use glip_train::config::{CriterionConfig, ModelConfig, Registry};

fn config(extra: &str) -> String {
    let tok = glip_testing::fixture("bert-tiny/tokenizer.json");
    format!(
        r#"
num_queries = 4
position_encoding = true
aux_loss = true
box_head = "mlp"
{extra}
[backbone]
type = "resnet"
depth = 18
[text]
tokenizer = "{}"
hidden = 16
layers = 1
heads = 2
[transformer]
d_model = 16
nhead = 2
num_encoder_layers = 1
num_decoder_layers = 2
dim_feedforward = 32
[head]
type = "token"
"#,
        tok.display()
    )
}

fn inputs() -> (ImageBatch, TextBatch) {
    let dev = Device::Cpu;
    let images =
        ImageBatch::unpadded(Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev).unwrap()).unwrap();
    let ids = Tensor::new(&[[101u32, 2417, 4418, 102], [101, 2630, 102, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 1, 0]], &dev).unwrap();
    let text = TextBatch::new(ids, mask, vec![vec![(0, 0); 4]; 2], vec![String::new(); 2]).unwrap();
    (images, text)
}

#[test]
fn builds_and_runs_every_built_in_combination() -> Result<()> {
    let (images, text) = inputs();
    for q in ["type = \"seed\"", "type = \"learned\"", "type = \"text-attend\"\nheads = 2"] {
        for f in ["type = \"none\"", "type = \"bi-attention\"\nheads = 2"] {
            let toml = config(&format!("[query_generator]\n{q}\n[fusion]\n{f}\n"));
            // Tables after the top-level keys: move them to the end so TOML scoping is right.
            let cfg: ModelConfig = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
            let vm = candle_nn::VarMap::new();
            let model = Registry::new().build_trainable(&cfg, &vm, 0, &Device::Cpu)?;
            let out = model.forward(&images, &text, true)?;
            assert_eq!(out.pred.pred_logits.dims(), &[2, 4, 4], "{q} / {f}");
            assert_eq!(out.aux.len(), 1);
        }
    }
    Ok(())
}

#[test]
fn unknown_keys_and_types_are_errors() {
    let bad = config("nonsense = 3\n");
    let e = toml::from_str::<ModelConfig>(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown field `nonsense`"), "{e}");
    // A built-in's misspelt parameter: an error when the config is read.
    let e = toml::from_str::<ModelConfig>(&config(
        "[query_generator]\ntype = \"text-attend\"\nhead = 2\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"text-attend\"") && e.contains("unknown field `head`"), "{e}");
    // A value of the wrong type names its key within the component's table, nested ones too
    // (serde's tagged enum alone would say only `model.detector`).
    for (table, key) in [
        (
            "[detector]\ntype = \"query-selection\"\ntext_cross_attention = 1\n",
            "text_cross_attention: ",
        ),
        (
            "[detector]\ntype = \"query-selection\"\ndenoising = { groups = \"two\" }\n",
            "denoising.groups: ",
        ),
        ("[fusion]\ntype = \"bi-attention\"\nheads = -2\n", "heads: "),
    ] {
        let e = toml::from_str::<ModelConfig>(&config(table)).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("invalid"), "{table}: {e}");
    }
    // An unregistered type: the registry's check names the key and the known types, before
    // anything is built; building says the same.
    let mut cfg: ModelConfig = toml::from_str(&config("[fusion]\ntype = \"telepathy\"\n")).unwrap();
    let e = Registry::new().check(&mut cfg, &mut CriterionConfig::default()).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("model.fusion: unknown type \"telepathy\" (known: bi-attention, feature-enhancer, none)"),
        "{e}"
    );
    let e = Registry::new()
        .build_trainable(&cfg, &candle_nn::VarMap::new(), 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.fusion: unknown type \"telepathy\""), "{e}");
}

/// The params of a registered component, typed.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MeanTextParams {
    #[serde(default = "one")]
    scale: f64,
}

fn one() -> f64 {
    1.0
}

#[test]
fn a_registered_components_params_are_checked_and_their_defaults_filled() {
    let mut r = Registry::new();
    r.register_query_generator("mean-text", |ctx, p: MeanTextParams, vb| {
        let _ = p.scale;
        Ok(Box::new(MeanTextQueries {
            proj: glip_kernels::nn::Linear::new(ctx.text_dim, ctx.d_model, vb.pp("proj"))?,
            n: ctx.model.num_queries,
        }) as Box<dyn QueryGenerator>)
    });
    let mut cfg: ModelConfig =
        toml::from_str(&config("[query_generator]\ntype = \"mean-text\"\n")).unwrap();
    r.check(&mut cfg, &mut CriterionConfig::default()).unwrap();
    let resolved = toml::to_string(&cfg).unwrap();
    assert!(
        resolved.contains("[query_generator]\ntype = \"mean-text\"\nscale = 1.0"),
        "{resolved}"
    );
    let mut cfg: ModelConfig =
        toml::from_str(&config("[query_generator]\ntype = \"mean-text\"\nscael = 2.0\n")).unwrap();
    let e = r.check(&mut cfg, &mut CriterionConfig::default()).unwrap_err().to_string();
    assert!(
        e.contains("model.query_generator.scael: type \"mean-text\": unknown field `scael`"),
        "{e}"
    );
    let mut cfg: ModelConfig =
        toml::from_str(&config("[query_generator]\ntype = \"mean-text\"\nscale = \"big\"\n"))
            .unwrap();
    let e = r.check(&mut cfg, &mut CriterionConfig::default()).unwrap_err().to_string();
    assert!(e.contains("model.query_generator.scale: type \"mean-text\": invalid type"), "{e}");
}

/// Every built-in type name of every slot's typed config is registered, and every registered
/// built-in has a typed config: the two lists cannot drift apart.
#[test]
fn every_built_in_type_is_registered() {
    use glip_train::config::*;
    let r = Registry::new();
    fn same<B: Builtins>(names: Vec<&str>) {
        let mut want: Vec<&str> = B::NAMES.to_vec();
        want.sort();
        assert_eq!(names, want, "{}", B::KEY);
    }
    same::<BackboneConfig>(r.backbones.names());
    same::<TextConfig>(r.text_encoders.names());
    same::<QueryGeneratorConfig>(r.query_generators.names());
    same::<FusionConfig>(r.fusions.names());
    same::<TransformerSlot>(r.transformers.names());
    same::<DetectorConfig>(r.detectors.names());
    same::<BoxHeadConfig>(r.box_heads.names());
    same::<HeadConfig>(r.class_heads.names());
    same::<MatcherConfig>(r.matchers.names());
    same::<CriterionKind>(r.criteria.names());
}

/// A researcher's own generator: queries are a learned mix of the mean text token.
struct MeanTextQueries {
    proj: glip_kernels::nn::Linear,
    n: usize,
}

impl QueryGenerator for MeanTextQueries {
    fn forward(&self, inputs: &QueryInputs<'_>, _train: bool) -> Result<Queries> {
        let mean = inputs.text.tokens.mean(1)?; // (b, dt)
        let q = self.proj.forward(&mean)?.unsqueeze(1)?.repeat((1, self.n, 1))?;
        Ok(Queries { content: q, pos: None, reference_boxes: None })
    }
    fn num_queries(&self) -> usize {
        self.n
    }
}

#[test]
fn a_users_query_generator_plugs_in_by_name() -> Result<()> {
    let mut builder = Registry::new();
    builder.register_query_generator("mean-text", |ctx, _: toml::Table, vb: VarBuilder<'_>| {
        Ok(Box::new(MeanTextQueries {
            proj: glip_kernels::nn::Linear::new(ctx.text_dim, ctx.d_model, vb.pp("proj"))?,
            n: ctx.model.num_queries,
        }) as Box<dyn QueryGenerator>)
    });
    let cfg: ModelConfig =
        toml::from_str(&config("[query_generator]\ntype = \"mean-text\"\n")).unwrap();
    let vm = candle_nn::VarMap::new();
    let model = builder.build_trainable(&cfg, &vm, 0, &Device::Cpu)?;
    let (images, text) = inputs();
    let out = model.forward(&images, &text, false)?;
    assert_eq!(out.hs.dims(), &[2, 4, 16]);
    assert!(vm.data().lock().unwrap().contains_key("query_generator.proj.weight"));
    Ok(())
}
