//! AWS event-stream framing (`application/vnd.amazon.eventstream`), the binary frames in which
//! Bedrock's streaming operations answer and botocore parses: a prelude with the lengths and its
//! CRC-32, string headers, the JSON payload and a CRC-32 of the whole message.
//!
//! Written here because only the string-header encoder is needed (about 20 lines) and the crate
//! that has it, `aws-smithy-eventstream`, brings the AWS SDK's runtime types along; the frame
//! layout is checked byte for byte against a frame botocore parsed (see the tests).

/// One frame with string headers `(name, value)` and `payload`.
pub fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        // Header names are at most 255 bytes and values at most 65,535: ours are short constants
        // and event type names.
        h.push(name.len().min(255) as u8);
        h.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
        h.push(7); // string
        let v = &value.as_bytes()[..value.len().min(u16::MAX as usize)];
        h.extend_from_slice(&(v.len() as u16).to_be_bytes());
        h.extend_from_slice(v);
    }
    let total = 12 + h.len() + payload.len() + 4;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_be_bytes());
    msg.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&msg);
    msg.extend_from_slice(&prelude_crc.to_be_bytes());
    msg.extend_from_slice(&h);
    msg.extend_from_slice(payload);
    let crc = crc32fast::hash(&msg);
    msg.extend_from_slice(&crc.to_be_bytes());
    msg
}

/// An event frame: `:event-type` `event_type`, JSON payload.
pub fn event(event_type: &str, payload: &serde_json::Value) -> Vec<u8> {
    frame(
        &[
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

/// An exception frame, which botocore raises as `EventStreamError` with `Error.Code` =
/// `exception_type` (a lowerCamel member of the stream's union, e.g. `modelStreamErrorException`).
pub fn exception(exception_type: &str, message: &str) -> Vec<u8> {
    frame(
        &[
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        serde_json::json!({ "message": message })
            .to_string()
            .as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The 148-byte ConverseStream text delta that botocore parsed (shared/reference/server-api.md
    /// §2.7), byte for byte.
    #[test]
    fn a_converse_stream_delta_matches_the_golden_bytes() {
        let payload = br#"{"contentBlockIndex":1,"delta":{"text":"Hi"}}"#;
        let got = frame(
            &[
                (":event-type", "contentBlockDelta"),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload,
        );
        assert_eq!(
            hex(&got),
            "0000009400000057b4ab9aee0b3a6576656e742d74797065070011636f6e74656e74426c6f636b44656c7461\
             0d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d74\
             7970650700056576656e747b22636f6e74656e74426c6f636b496e646578223a312c2264656c7461223a7b22\
             74657874223a224869227d7d9eb12370"
        );
        // The same through `event`, whose JSON serialisation keeps the key order.
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(event("contentBlockDelta", &v), got);
    }

    /// The InvokeModelWithResponseStream chunk of the reference: lengths and both CRCs.
    #[test]
    fn an_invoke_stream_chunk_has_the_reference_lengths_and_crcs() {
        let payload =
            br#"{"bytes":"eyJjaG9pY2VzIjpbeyJ0ZXh0IjoiSGkiLCJzdG9wX3JlYXNvbiI6bnVsbH1dfQ=="}"#;
        let got = frame(
            &[
                (":event-type", "chunk"),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload,
        );
        assert_eq!(got.len(), 167);
        assert_eq!(&got[4..8], &75u32.to_be_bytes());
        assert_eq!(hex(&got[8..12]), "462b04f7");
        assert_eq!(hex(&got[163..]), "78e62558");
    }
}
