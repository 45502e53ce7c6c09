//! Reading request bodies: a size limit, JSON that must be an object, and typed fields whose
//! errors name the field and its valid range in the words of the API at hand (Bedrock's
//! "Malformed input request: #/temperature: ..." or OpenAI's "Invalid value for 'temperature'").

use axum::body::Body;
use serde_json::{Map, Value};

use crate::error::{ApiError, Flavor, Kind};

/// A bad field, worded as `flavor`'s API words it.
pub fn bad(flavor: Flavor, field: &str, problem: impl std::fmt::Display) -> ApiError {
    let message = match flavor {
        Flavor::Bedrock => format!(
            "Malformed input request: #/{}: {problem}, please reformat your input and try again.",
            field.replace('.', "/")
        ),
        Flavor::OpenAi => format!("Invalid value for '{field}': {problem}."),
        Flavor::OpenSearch => format!("[{field}] {problem}"),
    };
    ApiError::invalid(flavor, field, message)
}

/// Reads at most `limit` bytes of `body` (413 beyond) and parses a JSON object.
pub async fn json_object(
    body: Body,
    limit: usize,
    flavor: Flavor,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` fails with a length-limit error, or on a broken connection.
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            ApiError::new(
                flavor,
                Kind::TooLarge,
                format!(
                    "the request body is larger than this server accepts ({limit} bytes): send \
                     less (or restart the server with a larger --max-body-bytes)"
                ),
            )
        } else {
            ApiError::new(
                flavor,
                Kind::Invalid,
                format!("cannot read the request body: {inner}"),
            )
        }
    })?;
    parse_object(&bytes, flavor)
}

/// Parses `bytes` as a JSON object.
pub fn parse_object(bytes: &[u8], flavor: Flavor) -> Result<Map<String, Value>, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(
            flavor,
            Kind::Invalid,
            "the request body is empty: send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::new(
            flavor,
            Kind::Invalid,
            format!(
                "the request body must be a JSON object, not {}",
                type_name(&other)
            ),
        )),
        Err(e) => Err(ApiError::new(
            flavor,
            Kind::Invalid,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// A JSON type's name for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the fields of one JSON object; `null` counts as absent.
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    flavor: Flavor,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// The fields of `obj`, whose names in messages get `prefix` (`"inferenceConfig."`).
    pub fn new(obj: &'a Map<String, Value>, flavor: Flavor, prefix: &'a str) -> Self {
        Self {
            obj,
            flavor,
            prefix,
        }
    }

    /// The field's full name in messages.
    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The raw value, absent when missing or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A bad value of `key`.
    pub fn bad(&self, key: &str, problem: impl std::fmt::Display) -> ApiError {
        bad(self.flavor, &self.name(key), problem)
    }

    /// A number in `lo..=hi`.
    pub fn f64_in(&self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Some(x) = v.as_f64() else {
            return Err(self.bad(key, format!("expected a number, got {}", type_name(v))));
        };
        if !(lo..=hi).contains(&x) {
            return Err(self.bad(key, format!("{x} is not in the range {lo}..={hi}")));
        }
        Ok(Some(x))
    }

    /// An integer in `lo..=hi`.
    pub fn int_in(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = match (v.as_i64(), v.as_f64()) {
            (Some(x), _) => x,
            // 512.0 is an integer too; 1e30 and 0.5 are not.
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9e15 => f as i64,
            _ => return Err(self.bad(key, format!("expected an integer, got {}", describe(v)))),
        };
        if !(lo..=hi).contains(&x) {
            return Err(self.bad(key, format!("{x} is not in the range {lo}..={hi}")));
        }
        Ok(Some(x))
    }

    /// A string.
    pub fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, format!("expected a string, got {}", type_name(v)))),
        }
    }

    /// A boolean.
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, format!("expected a boolean, got {}", type_name(v)))),
        }
    }

    /// An object.
    pub fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.bad(key, format!("expected an object, got {}", type_name(v)))),
        }
    }

    /// An array.
    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(key, format!("expected an array, got {}", type_name(v)))),
        }
    }

    /// Stop strings: one string or an array of at most `max` non-empty strings.
    pub fn stops(&self, key: &str, max: usize) -> Result<Vec<String>, ApiError> {
        let list: Vec<&Value> = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => {
                return if s.is_empty() {
                    Err(self.bad(key, "a stop string cannot be empty"))
                } else {
                    Ok(vec![s.clone()])
                }
            }
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => {
                return Err(self.bad(
                    key,
                    format!(
                        "expected a string or an array of strings, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        if list.len() > max {
            return Err(self.bad(
                key,
                format!(
                    "{} stop strings given, at most {max} are allowed",
                    list.len()
                ),
            ));
        }
        list.into_iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() && s.len() <= 1000 => Ok(s.clone()),
                Value::String(_) => Err(self.bad(key, "stop strings must be 1 to 1000 bytes")),
                other => Err(self.bad(key, format!("expected strings, got {}", type_name(other)))),
            })
            .collect()
    }

    /// Fails on a key not in `known` (Bedrock refuses extraneous keys).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        if let Some(k) = self.obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                self.flavor,
                self.name(k),
                match self.flavor {
                    Flavor::Bedrock => format!(
                        "Malformed input request: #: extraneous key [{k}] is not permitted, \
                         please reformat your input and try again. Accepted keys: {}",
                        known.join(", ")
                    ),
                    Flavor::OpenAi => format!(
                        "Unrecognized request argument supplied: {k} (accepted: {})",
                        known.join(", ")
                    ),
                    Flavor::OpenSearch => {
                        format!("unknown field [{k}] (accepted: {})", known.join(", "))
                    }
                },
            ));
        }
        Ok(())
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_string(),
    }
}
