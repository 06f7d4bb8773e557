//! The running kernel's type information (/sys/kernel/btf/vmlinux), read
//! for what a loader fills into a program it relocates: the BTF ids of
//! kernel functions (kfunc calls, an iterator's attach point) and the
//! offsets of struct fields, which differ between kernel builds. Needed by
//! the one program the agent assembles itself, since aya 0.14's loader has
//! no kfunc relocation.
use std::{borrow::Cow, io};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

/// BTF kinds this reader looks into (linux/btf.h).
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_TYPE_TAG: u8 = 18;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({VMLINUX}): {0}")]
    Read(io::Error),
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

/// One type: where its kind-specific part starts in the data.
struct Type {
    kind: u8,
    name_offset: u32,
    vlen: u16,
    /// Bitfield members carry their bit offset in the low 24 bits.
    kind_flag: bool,
    /// The referenced type (typedefs, qualifiers, functions).
    referenced: u32,
    extra: usize,
}

pub struct KernelBtf {
    data: Vec<u8>,
    strings: std::ops::Range<usize>,
    /// Type ids start at 1: id N is `types[N - 1]`.
    types: Vec<Type>,
}

impl KernelBtf {
    pub fn load() -> Result<Self, BtfError> {
        Self::parse(std::fs::read(VMLINUX).map_err(BtfError::Read)?)
    }

    fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|bytes| u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("no BTF header"));
        }
        let header_len = u32_at(4)? as usize;
        let (type_offset, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (string_offset, string_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = header_len + type_offset;
        let types_end = types_start + type_len;
        let strings = header_len + string_offset..header_len + string_offset + string_len;
        if types_end > data.len() || strings.end > data.len() {
            return Err(BtfError::Malformed("sections beyond the data"));
        }
        let mut types = Vec::new();
        let mut at = types_start;
        while at < types_end {
            let info = u32_at(at + 4)?;
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            let extra = at + 12;
            let extra_len = match kind {
                1 | 14 | 17 => 4,                          // int, var, decl tag
                3 => 12,                                   // array
                4 | 5 | 15 | 19 => 12 * usize::from(vlen), // struct, union, datasec, enum64
                6 | 13 => 8 * usize::from(vlen),           // enum, func proto
                2 | 7..=12 | 16 | 18 => 0,                 // pointers, qualifiers, func, float
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(Type {
                kind,
                name_offset: u32_at(at)?,
                vlen,
                kind_flag: info >> 31 == 1,
                referenced: u32_at(at + 8)?,
                extra,
            });
            at = extra + extra_len;
        }
        Ok(Self {
            data,
            strings,
            types,
        })
    }

    fn name(&self, offset: u32) -> Cow<'_, str> {
        let start = self.strings.start + offset as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end])
    }

    fn find(&self, kind: u8, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|ty| ty.kind == kind && self.name(ty.name_offset) == name)
            .map(|index| index as u32 + 1)
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// The BTF id of kernel function `name` (a kfunc to call, or an
    /// iterator's `bpf_iter_*` attach point).
    pub fn function(&self, name: &str) -> Result<u32, BtfError> {
        self.find(KIND_FUNC, name)
            .ok_or_else(|| BtfError::Missing(format!("function {name}")))
    }

    /// Where field `path` (`["inet_conn", "icsk_inet", ...]`) of struct
    /// `name` starts, in bytes; anonymous structs and unions on the way are
    /// looked through as C does.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("field {name}.{}", path.join(".")));
        let mut id = self.find(KIND_STRUCT, name).ok_or_else(missing)?;
        let mut bits = 0;
        for field in path {
            let (offset, member) = self.member(id, field).ok_or_else(missing)?;
            bits += offset;
            id = member;
        }
        if bits % 8 != 0 {
            return Err(BtfError::Malformed(
                "a bitfield where a whole field was expected",
            ));
        }
        Ok(bits / 8)
    }

    /// Member `field` of struct or union `id`: its bit offset and type,
    /// looking into anonymous members.
    fn member(&self, id: u32, field: &str) -> Option<(u32, u32)> {
        let ty = self.get(self.strip(id)?)?;
        if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
            return None;
        }
        for index in 0..usize::from(ty.vlen) {
            let at = ty.extra + 12 * index;
            let word = |offset: usize| -> Option<u32> {
                let bytes = self.data.get(at + offset..at + offset + 4)?;
                Some(u32::from_ne_bytes(bytes.try_into().ok()?))
            };
            let (name_offset, member, offset) = (word(0)?, word(4)?, word(8)?);
            let bit_offset = if ty.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            if name_offset == 0 {
                if let Some((inner, found)) = self.member(member, field) {
                    return Some((bit_offset + inner, found));
                }
            } else if self.name(name_offset) == field {
                return Some((bit_offset, member));
            }
        }
        None
    }

    /// The type under typedefs and qualifiers.
    fn strip(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            match self.get(id)?.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = self.get(id)?.referenced;
                }
                _ => return Some(id),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_functions_and_fields_of_the_running_kernel() {
        let btf = KernelBtf::load().expect("this kernel has BTF");
        assert!(btf.function("bpf_iter_tcp").is_ok());
        assert!(btf.function("tcp_v4_connect").is_ok());
        assert!(matches!(
            btf.function("no_such_function_here"),
            Err(BtfError::Missing(_))
        ));
        // struct sock starts every TCP socket, so its fields are where the
        // path through the embedded structs says.
        let direct = btf.offset_of("sock", &["sk_backlog", "len"]).unwrap();
        let embedded = btf
            .offset_of(
                "tcp_sock",
                &["inet_conn", "icsk_inet", "sk", "sk_backlog", "len"],
            )
            .unwrap();
        assert_eq!(direct, embedded);
        // `sk_family` sits in sock_common's anonymous unions, at offset 16
        // on every kernel (its layout is ABI for sock_diag's byte code).
        assert_eq!(btf.offset_of("sock_common", &["skc_family"]).unwrap(), 16);
        let rcv_nxt = btf.offset_of("tcp_sock", &["rcv_nxt"]).unwrap();
        let copied_seq = btf.offset_of("tcp_sock", &["copied_seq"]).unwrap();
        assert_ne!(rcv_nxt, copied_seq);
        assert!(btf.offset_of("tcp_sock", &["no_such_field"]).is_err());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(matches!(
            KernelBtf::parse(vec![0; 64]),
            Err(BtfError::Malformed(_))
        ));
        let mut truncated = std::fs::read(VMLINUX).unwrap();
        truncated.truncate(4096);
        assert!(KernelBtf::parse(truncated).is_err());
    }
}
