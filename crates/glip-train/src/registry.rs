//! The component registry: every swappable slot of a model and its loss (backbone, text
//! encoder, query generator, fusion, transformer, detector, box head, class head, matcher,
//! criterion) maps a `type` name to a factory.
//!
//! The built-ins register themselves through the same [`Registry::register_backbone`] (and
//! friends) that a researcher's crate calls; nothing outside a registry chooses a component by
//! its name. A slot's config is a [`Slot`]: one of the built-ins' typed parameters (a
//! serde-tagged enum, so a misspelt key is an error naming it and the defaults appear in
//! `config.resolved.toml`), or `Custom { type, params }` for a registered name, whose
//! parameters are checked by [`Registry::check`] before anything trains.

use crate::config::{CriterionConfig, ModelConfig};
use crate::Error;
use candle_core::{Device, Result};
use candle_nn::VarBuilder;
use glip_core::{
    Backbone, BoxHead, ClassHead, Criterion, Detector, Fusion, Matcher, QueryGenerator,
    TextEncoder, Transformer,
};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// The typed built-ins of one slot: a serde enum tagged by `type`.
pub trait Builtins: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug {
    /// The slot's key in a config (`model.backbone`), for errors.
    const KEY: &'static str;
    /// The built-ins' `type` names.
    const NAMES: &'static [&'static str];
    /// The type of a slot whose table gives none (`[model.text]` is a BERT unless it says).
    const DEFAULT_TYPE: Option<&'static str> = None;

    /// Where the parameters of the built-in `kind` (the slot's table without `type`) are wrong,
    /// read as the variant's own type: the tagged enum's error does not say (serde buffers an
    /// internally tagged enum's content, which loses the key a value was at). `None` if they
    /// read.
    fn param_error(kind: &str, params: &toml::Table) -> Option<ParamError>;
}

/// One slot of a config: a built-in with typed parameters, or a registered component.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot<B> {
    /// A built-in.
    Builtin(B),
    /// A component registered under `kind` (`type = "kind"` in the config).
    Custom {
        /// The registered name.
        kind: String,
        /// Its parameters (every key of the table but `type`).
        params: toml::Table,
    },
}

impl<B: Builtins> Slot<B> {
    /// The `type` name.
    pub fn kind(&self) -> String {
        self.split().0
    }

    /// `(type, parameters)`: what the registry's factory is called with.
    pub fn split(&self) -> (String, toml::Table) {
        match self {
            Slot::Builtin(b) => {
                let mut t = match toml::Value::try_from(b) {
                    Ok(toml::Value::Table(t)) => t,
                    _ => toml::Table::new(),
                };
                let kind = match t.remove("type") {
                    Some(toml::Value::String(s)) => s,
                    _ => String::new(),
                };
                (kind, t)
            }
            Slot::Custom { kind, params } => (kind.clone(), params.clone()),
        }
    }

    /// A registered component with parameters.
    pub fn custom(kind: &str, params: toml::Table) -> Self {
        Slot::Custom { kind: kind.to_string(), params }
    }

    /// The built-in's parameters, if it is one.
    pub fn builtin(&self) -> Option<&B> {
        match self {
            Slot::Builtin(b) => Some(b),
            Slot::Custom { .. } => None,
        }
    }
}

impl<B> From<B> for Slot<B> {
    fn from(b: B) -> Self {
        Slot::Builtin(b)
    }
}

impl<B: Builtins> Serialize for Slot<B> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Slot::Builtin(b) => b.serialize(s),
            Slot::Custom { kind, params } => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(params.len() + 1))?;
                m.serialize_entry("type", kind)?;
                for (k, v) in params {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

impl<'de, B: Builtins> Deserialize<'de> for Slot<B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Through JSON's value, which holds what every format gives (a checkpoint's JSON has
        // nulls for unset options: they are left out, as TOML would).
        let mut t = match json_to_toml(serde_json::Value::deserialize(d)?) {
            Some(toml::Value::String(s)) => {
                let mut t = toml::Table::new();
                t.insert("type".into(), toml::Value::String(s));
                t
            }
            Some(toml::Value::Table(t)) => t,
            other => {
                return Err(D::Error::custom(format!(
                    "expected a table with a `type` (or a type name), found {}",
                    other.as_ref().map_or("nothing", toml::Value::type_str)
                )))
            }
        };
        let kind = match (t.get("type"), B::DEFAULT_TYPE) {
            (Some(toml::Value::String(s)), _) => s.clone(),
            (Some(v), _) => {
                return Err(D::Error::custom(format!("`type` must be a string, found {v}")))
            }
            (None, Some(default)) => {
                t.insert("type".into(), toml::Value::String(default.into()));
                default.to_string()
            }
            (None, None) => {
                return Err(D::Error::custom(format!(
                    "no `type` (one of {}, or a registered name)",
                    B::NAMES.join(", ")
                )))
            }
        };
        if B::NAMES.contains(&kind.as_str()) {
            B::deserialize(toml::Value::Table(t.clone())).map(Slot::Builtin).map_err(|e| {
                t.remove("type");
                let msg = match B::param_error(&kind, &t) {
                    Some(ParamError { path, msg }) if !path.is_empty() => format!("{path}: {msg}"),
                    _ => e.message().trim().to_string(),
                };
                D::Error::custom(format!("type {kind:?}: {msg}"))
            })
        } else {
            t.remove("type");
            Ok(Slot::Custom { kind, params: t })
        }
    }
}

/// A JSON value as TOML (nulls, which TOML has not, are left out).
fn json_to_toml(v: serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => toml::Value::Boolean(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        J::String(s) => toml::Value::String(s),
        J::Array(a) => toml::Value::Array(a.into_iter().filter_map(json_to_toml).collect()),
        J::Object(o) => toml::Value::Table(
            o.into_iter().filter_map(|(k, v)| json_to_toml(v).map(|v| (k, v))).collect(),
        ),
    })
}

/// What a factory sees: the configs, the widths decided so far, the registry (a detector
/// builds its own query generator and heads through it), the device.
#[derive(Clone, Copy)]
pub struct BuildContext<'a> {
    /// The registry (for components made of other components).
    pub registry: &'a Registry,
    /// The model config.
    pub model: &'a ModelConfig,
    /// Width of the text features (0 before the text encoder is built).
    pub text_dim: usize,
    /// Transformer width.
    pub d_model: usize,
    /// Whether the detector runs the transformer's decoder (for the transformer's factory).
    pub decoder: bool,
    /// The loss config (for matchers and criteria).
    pub loss: Option<&'a CriterionConfig>,
    /// Where parameters live.
    pub device: &'a Device,
}

impl std::fmt::Debug for BuildContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildContext")
            .field("text_dim", &self.text_dim)
            .field("d_model", &self.d_model)
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl BuildContext<'_> {
    /// The loss config; an error outside loss building.
    pub fn loss(&self) -> Result<&CriterionConfig> {
        self.loss.ok_or_else(|| candle_core::Error::Msg("no loss config in this context".into()))
    }
}

type BuildFn<T, A> =
    Box<dyn Fn(&BuildContext<'_>, &toml::Table, A) -> Result<Box<T>> + Send + Sync>;
type CheckFn =
    Box<dyn Fn(&toml::Table) -> std::result::Result<toml::Table, ParamError> + Send + Sync>;

struct Entry<T: ?Sized, A> {
    build: BuildFn<T, A>,
    check: CheckFn,
}

/// The factories of one slot, by `type` name.
pub struct Family<T: ?Sized, A> {
    key: &'static str,
    entries: BTreeMap<String, Entry<T, A>>,
}

impl<T: ?Sized, A> std::fmt::Debug for Family<T, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

/// A component's parameters, or the key (below the slot's, empty for the table itself) and the
/// message of what is wrong with them.
pub(crate) fn params_of<P: DeserializeOwned>(
    params: &toml::Table,
) -> std::result::Result<P, ParamError> {
    serde_path_to_error::deserialize(toml::Value::Table(params.clone())).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().message().trim().to_string();
        ParamError { path: if path == "." { String::new() } else { path }, msg }
    })
}

/// What is wrong with a component's parameters, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The key within the component's table (`denoising.groups`), empty for the table itself.
    pub path: String,
    /// What is wrong.
    pub msg: String,
}

impl ParamError {
    /// The full key: the slot's (`model.detector`), then the path within the table.
    pub fn key(&self, slot: &str) -> String {
        match self.path.as_str() {
            "" => slot.to_string(),
            p => format!("{slot}.{p}"),
        }
    }
}

impl<T: ?Sized + 'static, A: 'static> Family<T, A> {
    fn new(key: &'static str) -> Self {
        Self { key, entries: BTreeMap::new() }
    }

    fn register<P, F>(&mut self, name: &str, f: F)
    where
        P: DeserializeOwned + Serialize + 'static,
        F: Fn(&BuildContext<'_>, P, A) -> Result<Box<T>> + Send + Sync + 'static,
    {
        let key = self.key;
        let kind = name.to_string();
        let build: BuildFn<T, A> = Box::new(move |ctx, params, a| {
            let p = params_of::<P>(params).map_err(|e| {
                candle_core::Error::Msg(format!("{} (type {kind:?}): {}", e.key(key), e.msg))
            })?;
            f(ctx, p, a)
        });
        let check: CheckFn = Box::new(|params| {
            let p = params_of::<P>(params)?;
            match toml::Value::try_from(&p) {
                Ok(toml::Value::Table(t)) => Ok(t),
                Ok(_) => Ok(toml::Table::new()),
                Err(e) => Err(ParamError { path: String::new(), msg: e.to_string() }),
            }
        });
        self.entries.insert(name.to_string(), Entry { build, check });
    }

    fn entry(&self, kind: &str) -> std::result::Result<&Entry<T, A>, Error> {
        self.entries.get(kind).ok_or_else(|| Error::Config {
            key: self.key.to_string(),
            msg: format!(
                "unknown type {kind:?} (known: {})",
                self.entries.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Makes the component `kind` from `params`.
    pub fn build(
        &self,
        kind: &str,
        params: &toml::Table,
        ctx: &BuildContext<'_>,
        a: A,
    ) -> Result<Box<T>> {
        let e = self.entry(kind).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        (e.build)(ctx, params, a)
    }

    /// Checks `params` for `kind` and returns them with every default filled in.
    pub fn check(
        &self,
        kind: &str,
        params: &toml::Table,
    ) -> std::result::Result<toml::Table, Error> {
        let e = self.entry(kind)?;
        (e.check)(params).map_err(|e| Error::Config {
            key: e.key(self.key),
            msg: format!("type {kind:?}: {}", e.msg),
        })
    }

    /// The registered names.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    fn check_slot<B: Builtins>(&self, slot: &mut Slot<B>) -> std::result::Result<(), Error> {
        let (kind, params) = slot.split();
        let filled = self.check(&kind, &params)?;
        if let Slot::Custom { params, .. } = slot {
            *params = filled;
        }
        Ok(())
    }
}

/// Model parts receive the scope of their parameters.
pub type Vb = VarBuilder<'static>;

/// Every slot's factories. [`Registry::new`] knows the built-ins; register your own with the
/// `register_*` methods, then build with [`Registry::build`] or run the whole `glip` command
/// line on it (`glip_cli::main_with`).
pub struct Registry {
    /// `model.backbone`.
    pub backbones: Family<dyn Backbone, Vb>,
    /// `model.text`.
    pub text_encoders: Family<dyn TextEncoder, Vb>,
    /// `model.query_generator`.
    pub query_generators: Family<dyn QueryGenerator, Vb>,
    /// `model.fusion`.
    pub fusions: Family<dyn Fusion, Vb>,
    /// `model.transformer`.
    pub transformers: Family<dyn Transformer, Vb>,
    /// `model.detector`.
    pub detectors: Family<dyn Detector, Vb>,
    /// `model.box_head`.
    pub box_heads: Family<dyn BoxHead, Vb>,
    /// `model.head` (class or token logits).
    pub class_heads: Family<dyn ClassHead, Vb>,
    /// `loss.matcher`.
    pub matchers: Family<dyn Matcher, ()>,
    /// `loss.criterion`.
    pub criteria: Family<dyn Criterion, ()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backbones", &self.backbones)
            .field("text_encoders", &self.text_encoders)
            .field("query_generators", &self.query_generators)
            .field("fusions", &self.fusions)
            .field("transformers", &self.transformers)
            .field("detectors", &self.detectors)
            .field("box_heads", &self.box_heads)
            .field("class_heads", &self.class_heads)
            .field("matchers", &self.matchers)
            .field("criteria", &self.criteria)
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

macro_rules! register_fns {
    ($($(#[$doc:meta])* $fn:ident => $field:ident : $t:ident, $a:ty;)*) => {$(
        $(#[$doc])*
        pub fn $fn<P, F>(&mut self, name: &str, f: F) -> &mut Self
        where
            P: DeserializeOwned + Serialize + 'static,
            F: Fn(&BuildContext<'_>, P, $a) -> Result<Box<dyn $t>> + Send + Sync + 'static,
        {
            self.$field.register(name, f);
            self
        }
    )*};
}

impl Registry {
    /// A registry of the built-in components only.
    pub fn new() -> Self {
        let mut r = Self::empty();
        crate::config::register_builtins(&mut r);
        r
    }

    /// A registry that knows no component at all.
    pub fn empty() -> Self {
        Self {
            backbones: Family::new("model.backbone"),
            text_encoders: Family::new("model.text"),
            query_generators: Family::new("model.query_generator"),
            fusions: Family::new("model.fusion"),
            transformers: Family::new("model.transformer"),
            detectors: Family::new("model.detector"),
            box_heads: Family::new("model.box_head"),
            class_heads: Family::new("model.head"),
            matchers: Family::new("loss.matcher"),
            criteria: Family::new("loss.criterion"),
        }
    }

    register_fns! {
        /// Registers a backbone under `name` (`[model.backbone] type = "name"`); its parameters
        /// `P` are read from the rest of that table (use `toml::Table` for any).
        register_backbone => backbones: Backbone, Vb;
        /// Registers a text encoder (`[model.text] type = "name"`).
        register_text_encoder => text_encoders: TextEncoder, Vb;
        /// Registers a query generator (`[model.query_generator] type = "name"`).
        register_query_generator => query_generators: QueryGenerator, Vb;
        /// Registers a fusion (`[model.fusion] type = "name"`).
        register_fusion => fusions: Fusion, Vb;
        /// Registers a transformer (`[model.transformer] type = "name"`; it must give
        /// `d_model`).
        register_transformer => transformers: Transformer, Vb;
        /// Registers a detector (`[model.detector] type = "name"`); its `vb` is the
        /// `detector` scope.
        register_detector => detectors: Detector, Vb;
        /// Registers a box head (`[model.box_head] type = "name"`).
        register_box_head => box_heads: BoxHead, Vb;
        /// Registers a class head (`[model.head] type = "name"`).
        register_class_head => class_heads: ClassHead, Vb;
        /// Registers a matcher (`[loss.matcher] type = "name"`).
        register_matcher => matchers: Matcher, ();
        /// Registers a criterion (`[loss.criterion] type = "name"`).
        register_criterion => criteria: Criterion, ();
    }

    /// Checks every slot of a model and a loss config against this registry (unknown types,
    /// misspelt or missing parameters), naming the key; fills in the defaults of registered
    /// components so that `config.resolved.toml` shows them.
    pub fn check(
        &self,
        model: &mut ModelConfig,
        loss: &mut CriterionConfig,
    ) -> std::result::Result<(), Error> {
        self.backbones.check_slot(&mut model.backbone)?;
        self.text_encoders.check_slot(&mut model.text)?;
        self.query_generators.check_slot(&mut model.query_generator)?;
        self.fusions.check_slot(&mut model.fusion)?;
        self.transformers.check_slot(&mut model.transformer)?;
        self.detectors.check_slot(&mut model.detector)?;
        self.box_heads.check_slot(&mut model.box_head)?;
        self.class_heads.check_slot(&mut model.head)?;
        self.matchers.check_slot(&mut loss.matcher)?;
        if let Some(c) = loss.criterion.as_mut() {
            self.criteria.check_slot(c)?;
        }
        Ok(())
    }
}
