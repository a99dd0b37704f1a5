//! Decoding of the `pgoutput` logical replication messages the relay needs.
//!
//! The transport (`START_REPLICATION`, keepalives, Begin/Commit framing) is
//! handled by `pgwire-replication`; what arrives here is the body of one
//! XLogData message in protocol version 1. Only Relation and Insert carry
//! information the relay uses: the publication publishes inserts only, so
//! Update/Delete/Truncate never arrive, and Origin/Type/Message are skipped.
//! Column values are in text format, as Postgres prints them.

use bytes::{Buf, Bytes};

use crate::error_class::ErrorClass;

/// A decoding failure: the stream is not what protocol version 1 promises.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("pgoutput string is not UTF-8")]
    NotUtf8,
    #[error("unexpected tuple column kind {0:?}")]
    ColumnKind(char),
}

impl DecodeError {
    /// A message that cannot be decoded: the run restarts and the stream
    /// sends it again.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Truncated(_) | Self::NotUtf8 | Self::ColumnKind(_) => ErrorClass::Retry,
        }
    }
}

/// A column of a relation, as announced by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    pub name: String,
    pub type_oid: u32,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Describes a table before its first change in a session (and after DDL).
    Relation { id: u32, namespace: String, name: String, columns: Vec<RelationColumn> },
    /// A new row; `None` is SQL NULL.
    Insert { relation_id: u32, values: Vec<Option<Bytes>> },
    /// Anything the relay does not act on.
    Other(u8),
}

/// Decodes one pgoutput message.
pub fn decode(mut buf: Bytes) -> Result<Message, DecodeError> {
    if !buf.has_remaining() {
        return Err(DecodeError::Truncated("message tag"));
    }
    match buf.get_u8() {
        b'R' => {
            let id = get_u32(&mut buf, "relation id")?;
            let namespace = get_cstr(&mut buf)?;
            let name = get_cstr(&mut buf)?;
            need(&buf, 3, "relation header")?;
            let _replica_identity = buf.get_u8();
            let ncols = buf.get_u16();
            let mut columns = Vec::with_capacity(ncols as usize);
            for _ in 0..ncols {
                need(&buf, 1, "column flags")?;
                let _flags = buf.get_u8();
                let name = get_cstr(&mut buf)?;
                let type_oid = get_u32(&mut buf, "column type")?;
                let _type_modifier = get_u32(&mut buf, "column type modifier")?;
                columns.push(RelationColumn { name, type_oid });
            }
            Ok(Message::Relation { id, namespace, name, columns })
        }
        b'I' => {
            let relation_id = get_u32(&mut buf, "relation id")?;
            need(&buf, 1, "tuple tag")?;
            let _new_tuple_tag = buf.get_u8();
            let values = decode_tuple(&mut buf)?;
            Ok(Message::Insert { relation_id, values })
        }
        other => Ok(Message::Other(other)),
    }
}

fn decode_tuple(buf: &mut Bytes) -> Result<Vec<Option<Bytes>>, DecodeError> {
    need(buf, 2, "column count")?;
    let ncols = buf.get_u16();
    let mut values = Vec::with_capacity(ncols as usize);
    for _ in 0..ncols {
        need(buf, 1, "column kind")?;
        match buf.get_u8() {
            b'n' | b'u' => values.push(None),
            b't' | b'b' => {
                let len = get_u32(buf, "column length")? as usize;
                need(buf, len, "column value")?;
                values.push(Some(buf.split_to(len)));
            }
            other => return Err(DecodeError::ColumnKind(other as char)),
        }
    }
    Ok(values)
}

fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::Truncated(what))
    } else {
        Ok(())
    }
}

fn get_u32(buf: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    need(buf, 4, what)?;
    Ok(buf.get_u32())
}

fn get_cstr(buf: &mut Bytes) -> Result<String, DecodeError> {
    let end = buf.iter().position(|b| *b == 0).ok_or(DecodeError::Truncated("string"))?;
    let s = buf.split_to(end);
    buf.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| DecodeError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn relation_bytes() -> Bytes {
        let mut b = bytes::BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        b.put_slice(b"public\0outbox\0");
        b.put_u8(b'd');
        b.put_u16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(20);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"payload\0");
        b.put_u32(3802);
        b.put_i32(-1);
        b.freeze()
    }

    #[test]
    fn decodes_relation() {
        let msg = decode(relation_bytes()).expect("decodes");
        assert_eq!(
            msg,
            Message::Relation {
                id: 16384,
                namespace: "public".into(),
                name: "outbox".into(),
                columns: vec![
                    RelationColumn { name: "id".into(), type_oid: 20 },
                    RelationColumn { name: "payload".into(), type_oid: 3802 },
                ],
            }
        );
    }

    #[test]
    fn decodes_insert_with_null() {
        let mut b = bytes::BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_u16(3);
        b.put_u8(b't');
        b.put_u32(2);
        b.put_slice(b"42");
        b.put_u8(b'n');
        b.put_u8(b't');
        b.put_u32(7);
        b.put_slice(b"{\"a\":1}");
        let msg = decode(b.freeze()).expect("decodes");
        assert_eq!(
            msg,
            Message::Insert {
                relation_id: 16384,
                values: vec![Some(Bytes::from_static(b"42")), None, Some(Bytes::from_static(b"{\"a\":1}"))],
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let full = relation_bytes();
        for cut in 1..full.len() {
            let _ = decode(full.slice(..cut));
        }
        assert!(decode(full.slice(..5)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(Bytes::from(data));
        }
    }
}
