//! Errors as each API's clients expect them: OpenAI's `{"error":{message,type,param,code}}` with
//! the status its client maps to an exception class, and Bedrock's `x-amzn-ErrorType` header with
//! a `{"message"}` body. Anything a retry cannot fix is a 4xx: botocore retries 5xx up to five
//! times, each re-running the whole generation.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API's error shape a response takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI (`/v1/...`, `/health`, `/metrics`, unknown routes).
    OpenAi,
    /// Amazon Bedrock runtime (`/model/{id}/...`).
    Bedrock,
    /// OpenSearch's REST API (indices, `_bulk`, `_search`, search pipelines, ml-commons memory).
    OpenSearch,
}

/// What went wrong, in terms both APIs can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A malformed body or an out-of-range parameter.
    Invalid,
    /// The prompt (plus the tokens asked for) does not fit the context window.
    ContextLength,
    /// Missing or wrong API key.
    Unauthorized,
    /// No such route, model or resource.
    NotFound,
    /// The body is larger than the server accepts.
    TooLarge,
    /// The queue is full: retry later.
    Busy,
    /// The server is shutting down.
    Unavailable,
    /// The engine failed while generating.
    Engine,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The shape it takes.
    pub flavor: Flavor,
    /// What kind of error.
    pub kind: Kind,
    /// For the user: what is wrong and what to do.
    pub message: String,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<String>,
    /// OpenSearch's exception type when it is more precise than the kind's
    /// (`index_not_found_exception`, `resource_already_exists_exception`, ...).
    pub opensearch_type: Option<&'static str>,
    /// The OpenSearch index the error is about.
    pub index: Option<String>,
}

impl ApiError {
    /// An error of `kind` in `flavor`'s shape.
    pub fn new(flavor: Flavor, kind: Kind, message: impl Into<String>) -> Self {
        Self {
            flavor,
            kind,
            message: message.into(),
            param: None,
            opensearch_type: None,
            index: None,
        }
    }

    /// An OpenSearch error of `kind` with OpenSearch's exception type `ty`.
    pub fn opensearch(kind: Kind, ty: &'static str, message: impl Into<String>) -> Self {
        Self {
            opensearch_type: Some(ty),
            ..Self::new(Flavor::OpenSearch, kind, message)
        }
    }

    /// The same error, about `index`.
    pub fn with_index(mut self, index: &str) -> Self {
        self.index = Some(index.to_string());
        self
    }

    /// A bad request naming the field at fault.
    pub fn invalid(flavor: Flavor, param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(flavor, Kind::Invalid, message)
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match (self.kind, self.flavor) {
            (Kind::Invalid | Kind::ContextLength, _) => StatusCode::BAD_REQUEST,
            (Kind::Unauthorized, Flavor::OpenAi | Flavor::OpenSearch) => StatusCode::UNAUTHORIZED,
            (Kind::Unauthorized, Flavor::Bedrock) => StatusCode::FORBIDDEN,
            (Kind::NotFound, _) => StatusCode::NOT_FOUND,
            (Kind::TooLarge, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (Kind::Busy, _) => StatusCode::TOO_MANY_REQUESTS,
            (Kind::Unavailable, _) => StatusCode::SERVICE_UNAVAILABLE,
            // Bedrock's ModelErrorException (424) is not retried by botocore; a generation that
            // failed once will fail again.
            (Kind::Engine, Flavor::Bedrock) => StatusCode::FAILED_DEPENDENCY,
            (Kind::Engine, Flavor::OpenAi | Flavor::OpenSearch) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// OpenAI's error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self.kind {
            Kind::Invalid | Kind::ContextLength | Kind::TooLarge => "invalid_request_error",
            Kind::Unauthorized => "authentication_error",
            Kind::NotFound => "not_found_error",
            Kind::Busy => "rate_limit_error",
            Kind::Unavailable => "unavailable_error",
            Kind::Engine => "server_error",
        }
    }

    /// Bedrock's exception name (the `x-amzn-ErrorType` header).
    pub fn bedrock_type(&self) -> &'static str {
        match self.kind {
            Kind::Invalid | Kind::ContextLength | Kind::TooLarge => "ValidationException",
            Kind::Unauthorized => "AccessDeniedException",
            Kind::NotFound => "ResourceNotFoundException",
            Kind::Busy => "ThrottlingException",
            Kind::Unavailable => "ServiceUnavailableException",
            Kind::Engine => "ModelErrorException",
        }
    }

    /// OpenSearch's exception type.
    pub fn opensearch_type(&self) -> &'static str {
        if let Some(t) = self.opensearch_type {
            return t;
        }
        match self.kind {
            Kind::Invalid | Kind::ContextLength => "illegal_argument_exception",
            Kind::TooLarge => "content_too_long_exception",
            Kind::Unauthorized => "security_exception",
            Kind::NotFound => "resource_not_found_exception",
            Kind::Busy => "rejected_execution_exception",
            Kind::Unavailable => "node_closed_exception",
            Kind::Engine => "exception",
        }
    }

    /// OpenSearch's error body: `{"error":{"root_cause":[..],"type","reason"},"status"}`.
    pub fn opensearch_body(&self) -> serde_json::Value {
        let mut cause = json!({"type": self.opensearch_type(), "reason": self.message});
        if let Some(index) = &self.index {
            cause["index"] = json!(index);
        }
        let mut error = cause.clone();
        error["root_cause"] = json!([cause]);
        json!({"error": error, "status": self.status().as_u16()})
    }

    /// The lowerCamel member name of an exception inside a Bedrock event stream.
    pub fn stream_exception(&self) -> &'static str {
        match self.kind {
            Kind::Invalid | Kind::ContextLength | Kind::TooLarge => "validationException",
            Kind::Busy => "throttlingException",
            Kind::Unavailable => "serviceUnavailableException",
            _ => "modelStreamErrorException",
        }
    }

    /// The OpenAI error object (also sent inside an SSE stream).
    pub fn openai_body(&self) -> serde_json::Value {
        let code = match self.kind {
            Kind::ContextLength => json!("context_length_exceeded"),
            _ => json!(self.status().as_u16()),
        };
        json!({"error": {
            "message": self.message,
            "type": self.openai_type(),
            "param": self.param,
            "code": code,
        }})
    }

    /// Converts a library error into an API error, worded for an HTTP client.
    pub fn from_engine(flavor: Flavor, err: &thinkrag_llm::Error) -> Self {
        use thinkrag_llm::Error as E;
        match err {
            E::InvalidParameter {
                name,
                value,
                expected,
            } => Self::invalid(
                flavor,
                *name,
                format!("{name} = {value} is out of range: expected {expected}"),
            ),
            E::PromptTooLong {
                prompt_tokens,
                context_window,
            } => Self::new(
                flavor,
                Kind::ContextLength,
                format!(
                    "the prompt is {prompt_tokens} tokens but this server's context window is \
                     {context_window} tokens: shorten the messages (or restart the server with a \
                     larger --context-window, up to the model's maximum)"
                ),
            ),
            E::QueueFull { waiting, limit } => Self::new(
                flavor,
                Kind::Busy,
                format!(
                    "the server is busy: {waiting} requests are waiting (its queue holds {limit}); \
                     retry later"
                ),
            ),
            E::ShuttingDown => Self::new(
                flavor,
                Kind::Unavailable,
                "the server is shutting down and takes no new requests",
            ),
            other => Self::new(flavor, Kind::Engine, format!("generation failed: {other}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self.flavor {
            Flavor::OpenAi => {
                let mut r = (status, axum::Json(self.openai_body())).into_response();
                // Tell the openai client not to retry what a retry cannot fix.
                let retry = matches!(self.kind, Kind::Busy | Kind::Unavailable);
                r.headers_mut().insert(
                    "x-should-retry",
                    HeaderValue::from_static(if retry { "true" } else { "false" }),
                );
                r
            }
            Flavor::OpenSearch => (status, axum::Json(self.opensearch_body())).into_response(),
            Flavor::Bedrock => {
                let mut r =
                    (status, axum::Json(json!({ "message": self.message }))).into_response();
                let ty = format!(
                    "{}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                    self.bedrock_type()
                );
                if let Ok(v) = HeaderValue::from_str(&ty) {
                    r.headers_mut().insert("x-amzn-ErrorType", v);
                }
                r
            }
        }
    }
}
