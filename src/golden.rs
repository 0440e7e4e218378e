//! Reader for reference-value files: safetensors holding f32 tensors, with the family and the
//! hyper-parameters in the header's `__metadata__` (the layout of `../shared/golden/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

pub struct GoldenTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub struct Golden {
    pub path: PathBuf,
    pub metadata: HashMap<String, String>,
    pub tensors: HashMap<String, GoldenTensor>,
}

impl Golden {
    pub fn open(path: impl AsRef<Path>) -> Result<Golden> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::file(path, format!("bad safetensors header: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::F64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                other => {
                    return Err(Error::file(
                        path,
                        format!("tensor `{name}` has dtype {other:?}; expected F32 or F64"),
                    ))
                }
            };
            tensors.insert(
                name,
                GoldenTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(Golden {
            path: path.to_path_buf(),
            metadata,
            tensors,
        })
    }

    pub fn tensor(&self, name: &str) -> Result<&GoldenTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::file(&self.path, format!("missing tensor `{name}`")))
    }

    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::file(&self.path, format!("metadata has no `{key}`")))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        v.parse().map_err(|_| {
            Error::file(
                &self.path,
                format!("metadata `{key}` = {v:?} is not a number"),
            )
        })
    }

    /// A metadata number, or `default` when the key is absent.
    pub fn meta_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.metadata.contains_key(key) {
            self.meta_f64(key)
        } else {
            Ok(default)
        }
    }
}
