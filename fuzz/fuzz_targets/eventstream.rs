//! AWS event-stream frames, the binary framing of Bedrock's streaming responses: frames built
//! from arbitrary headers and payloads must decode (by the independent reader below, written
//! from the AWS specification) to what went in, with both CRCs right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinkrag_server::eventstream;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one frame: (headers, payload), checking lengths and CRCs.
fn decode(msg: &[u8]) -> (Vec<(Vec<u8>, Vec<u8>)>, Vec<u8>) {
    assert!(msg.len() >= 16);
    let total = be32(&msg[0..4]) as usize;
    let headers_len = be32(&msg[4..8]) as usize;
    assert_eq!(total, msg.len());
    assert_eq!(be32(&msg[8..12]), crc32fast::hash(&msg[..8]), "prelude CRC");
    assert_eq!(be32(&msg[total - 4..]), crc32fast::hash(&msg[..total - 4]), "message CRC");
    let mut h = &msg[12..12 + headers_len];
    let mut headers = Vec::new();
    while !h.is_empty() {
        let n = h[0] as usize;
        let name = h[1..1 + n].to_vec();
        assert_eq!(h[1 + n], 7, "string header");
        let len = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
        let value = h[4 + n..4 + n + len].to_vec();
        headers.push((name, value));
        h = &h[4 + n + len..];
    }
    (headers, msg[12 + headers_len..total - 4].to_vec())
}

fuzz_target!(|data: &[u8]| {
    // Up to four headers and a payload, split at 0xFF bytes.
    let mut parts = data.split(|&b| b == 0xFF);
    let mut owned = Vec::new();
    for _ in 0..4 {
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else { break };
        owned.push((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()));
    }
    let payload: Vec<u8> = parts.flatten().copied().collect();
    let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let msg = eventstream::frame(&headers, &payload);
    let (got, got_payload) = decode(&msg);
    assert_eq!(got_payload, payload);
    assert_eq!(got.len(), headers.len());
    for ((name, value), (n, v)) in got.iter().zip(&headers) {
        let n = n.as_bytes();
        let v = v.as_bytes();
        assert_eq!(&name[..], &n[..n.len().min(255)]);
        assert_eq!(&value[..], &v[..v.len().min(u16::MAX as usize)]);
    }
    // The JSON event and exception frames decode too.
    let text = String::from_utf8_lossy(data);
    let (h, p) = decode(&eventstream::event(&text, &serde_json::json!({ "text": text })));
    assert_eq!(h.len(), 3);
    let v: serde_json::Value = serde_json::from_slice(&p).expect("payload is JSON");
    assert_eq!(v["text"], serde_json::Value::String(text.to_string()));
    let (_, p) = decode(&eventstream::exception(&text, &text));
    serde_json::from_slice::<serde_json::Value>(&p).expect("payload is JSON");
});
