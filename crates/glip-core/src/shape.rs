//! Named-axis tensor-shape contracts.
//!
//! A contract states once what shape a tensor must have, in axis names and fixed sizes
//! (`"b q 4"`), and binds every name to the first size it sees, remembering which tensor bound
//! it. Later tensors that use the same name must agree, so the `b` of `pred_boxes` is checked
//! against the `b` of the images that produced them.
//!
//! ```
//! use glip_core::shape::Contract;
//!
//! let mut c = Contract::new();
//! c.check("images", &[2, 3, 64, 80], "b 3 h w").unwrap();
//! c.bind("q", 100, "queries").unwrap();
//! let err = c.check("pred_boxes", &[2, 90, 4], "b q 4").unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "pred_boxes: axis q = 90, expected 100 (bound by queries) in shape [2, 90, 4]"
//! );
//! assert_eq!(c.get("h"), Some(64));
//! ```

use std::fmt;

/// One axis of a shape specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Axis {
    /// A named axis: bound to the first size seen, checked against it afterwards.
    Named(String),
    /// A fixed size.
    Fixed(usize),
    /// Any size (`_` in a spec).
    Any,
}

/// A parsed shape specification such as `"b q 4"` or `"b _ d"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec(pub Vec<Axis>);

impl Spec {
    /// Parses a whitespace-separated spec: identifiers are axis names, integers fixed sizes,
    /// `_` any size.
    pub fn parse(spec: &str) -> Result<Self, ShapeError> {
        let axes = spec
            .split_whitespace()
            .map(|tok| {
                if tok == "_" {
                    Ok(Axis::Any)
                } else if let Ok(n) = tok.parse::<usize>() {
                    Ok(Axis::Fixed(n))
                } else if tok.chars().all(|c| c.is_alphanumeric() || c == '_')
                    && tok.chars().next().is_some_and(|c| c.is_alphabetic())
                {
                    Ok(Axis::Named(tok.to_string()))
                } else {
                    Err(ShapeError::BadSpec { spec: spec.to_string(), token: tok.to_string() })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Spec(axes))
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match a {
                Axis::Named(n) => f.write_str(n)?,
                Axis::Fixed(n) => write!(f, "{n}")?,
                Axis::Any => f.write_str("_")?,
            }
        }
        Ok(())
    }
}

/// Why a shape did not satisfy its contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// The tensor has the wrong number of axes.
    #[error("{tensor}: expected rank {expected} ({spec}), found shape {found:?}")]
    Rank { tensor: String, spec: String, expected: usize, found: Vec<usize> },
    /// A fixed axis has the wrong size.
    #[error("{tensor}: axis {index} = {size}, expected {expected} in shape {found:?}")]
    Fixed { tensor: String, index: usize, size: usize, expected: usize, found: Vec<usize> },
    /// A named axis disagrees with its earlier binding.
    #[error("{tensor}: axis {axis} = {size}, expected {expected} (bound by {bound_by}) in shape {found:?}")]
    Bound {
        tensor: String,
        axis: String,
        size: usize,
        expected: usize,
        bound_by: String,
        found: Vec<usize>,
    },
    /// The same name appears twice in one spec with different sizes.
    #[error("{tensor}: axis {axis} = {second}, expected {first} (bound earlier in the same shape) in shape {found:?}")]
    SelfInconsistent {
        tensor: String,
        axis: String,
        first: usize,
        second: usize,
        found: Vec<usize>,
    },
    /// The specification itself does not parse.
    #[error("bad shape spec {spec:?}: token {token:?} is neither a name, a size nor `_`")]
    BadSpec { spec: String, token: String },
}

impl ShapeError {
    /// The axis name (or `#index` for fixed axes) the error is about, if any.
    pub fn axis(&self) -> Option<String> {
        match self {
            ShapeError::Bound { axis, .. } | ShapeError::SelfInconsistent { axis, .. } => {
                Some(axis.clone())
            }
            ShapeError::Fixed { index, .. } => Some(format!("#{index}")),
            ShapeError::Rank { .. } | ShapeError::BadSpec { .. } => None,
        }
    }
}

impl From<ShapeError> for candle_core::Error {
    fn from(e: ShapeError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// A set of axis bindings shared by the tensors of one computation.
#[derive(Debug, Clone, Default)]
pub struct Contract {
    /// (name, size, bound by)
    bindings: Vec<(String, usize, String)>,
}

impl Contract {
    /// An empty contract: nothing bound yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The size bound to `axis`, if any.
    pub fn get(&self, axis: &str) -> Option<usize> {
        self.bindings.iter().find(|(n, _, _)| n == axis).map(|(_, s, _)| *s)
    }

    /// Binds `axis` to `size` on behalf of `by` (a config value, say); errors if it is already
    /// bound to another size.
    pub fn bind(&mut self, axis: &str, size: usize, by: &str) -> Result<(), ShapeError> {
        match self.bindings.iter().find(|(n, _, _)| n == axis) {
            Some((_, s, b)) if *s != size => Err(ShapeError::Bound {
                tensor: by.to_string(),
                axis: axis.to_string(),
                size,
                expected: *s,
                bound_by: b.clone(),
                found: vec![size],
            }),
            Some(_) => Ok(()),
            None => {
                self.bindings.push((axis.to_string(), size, by.to_string()));
                Ok(())
            }
        }
    }

    /// Checks `dims` (the shape of `tensor`) against `spec`, binding new names.
    ///
    /// Nothing is bound when the check fails, so a contract stays usable after an error.
    pub fn check(&mut self, tensor: &str, dims: &[usize], spec: &str) -> Result<(), ShapeError> {
        let spec = Spec::parse(spec)?;
        self.check_spec(tensor, dims, &spec)
    }

    /// [`Contract::check`] with an already parsed spec.
    pub fn check_spec(
        &mut self,
        tensor: &str,
        dims: &[usize],
        spec: &Spec,
    ) -> Result<(), ShapeError> {
        if dims.len() != spec.0.len() {
            return Err(ShapeError::Rank {
                tensor: tensor.to_string(),
                spec: spec.to_string(),
                expected: spec.0.len(),
                found: dims.to_vec(),
            });
        }
        let mut new: Vec<(String, usize)> = Vec::new();
        for (index, (axis, &size)) in spec.0.iter().zip(dims).enumerate() {
            match axis {
                Axis::Any => {}
                Axis::Fixed(expected) => {
                    if size != *expected {
                        return Err(ShapeError::Fixed {
                            tensor: tensor.to_string(),
                            index,
                            size,
                            expected: *expected,
                            found: dims.to_vec(),
                        });
                    }
                }
                Axis::Named(name) => {
                    if let Some((_, s, by)) = self.bindings.iter().find(|(n, _, _)| n == name) {
                        if *s != size {
                            return Err(ShapeError::Bound {
                                tensor: tensor.to_string(),
                                axis: name.clone(),
                                size,
                                expected: *s,
                                bound_by: by.clone(),
                                found: dims.to_vec(),
                            });
                        }
                    } else if let Some((_, first)) = new.iter().find(|(n, _)| n == name) {
                        if *first != size {
                            return Err(ShapeError::SelfInconsistent {
                                tensor: tensor.to_string(),
                                axis: name.clone(),
                                first: *first,
                                second: size,
                                found: dims.to_vec(),
                            });
                        }
                    } else {
                        new.push((name.clone(), size));
                    }
                }
            }
        }
        self.bindings.extend(new.into_iter().map(|(n, s)| (n, s, tensor.to_string())));
        Ok(())
    }

    /// [`Contract::check`] on a candle tensor, returning a candle error.
    pub fn tensor(
        &mut self,
        tensor: &str,
        t: &candle_core::Tensor,
        spec: &str,
    ) -> candle_core::Result<()> {
        Ok(self.check(tensor, t.dims(), spec)?)
    }
}

/// Checks one tensor against a spec with no bindings shared with others.
pub fn check(tensor: &str, t: &candle_core::Tensor, spec: &str) -> candle_core::Result<()> {
    Contract::new().tensor(tensor, t, spec)
}
