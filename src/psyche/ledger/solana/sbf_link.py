"""Link one upstream ``bpfel`` object file into a Solana program (SBF v0 shared object).

Debian's ``ld.lld`` does not know the BPF call relocation (``R_BPF_64_32``) that a
syscall needs, so this module is the linker: it takes the relocatable object
clang wrote and lays out the small ELF the Solana loader reads — ``.text`` at a
virtual address equal to its file offset, the syscalls as undefined dynamic
symbols, one ``R_BPF_64_32`` dynamic relocation per syscall call site, and a
``.dynamic`` table pointing at them. The loader hashes each symbol's name into
the call instruction when it loads the program.

Pure: bytes in, bytes out. It refuses (``LinkError``) anything our program does
not need and the loader would mishandle: data sections, other relocation kinds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EM_BPF = 247
ET_DYN = 3
SHT_SYMTAB, SHT_STRTAB, SHT_REL, SHT_DYNAMIC, SHT_DYNSYM = 2, 3, 9, 6, 11
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
PT_LOAD, PT_DYNAMIC = 1, 2
PF_X, PF_R = 1, 4
R_BPF_64_32 = 10
DT_NULL, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT = 0, 5, 6, 10, 11
DT_REL, DT_RELSZ, DT_RELENT, DT_TEXTREL = 17, 18, 19, 22

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")
_DYN = struct.Struct("<qQ")


class LinkError(ValueError):
    """The object file holds something this linker (and our program) does not support."""


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int


def _sections(obj: bytes) -> list[_Section]:
    hdr = _EHDR.unpack_from(obj, 0)
    ident, _type, machine = hdr[0], hdr[1], hdr[2]
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise LinkError("not a 64-bit little-endian ELF object")
    if machine != EM_BPF:
        raise LinkError(f"object is for machine {machine}, not BPF ({EM_BPF})")
    shoff, shnum, shstrndx = hdr[6], hdr[12], hdr[13]
    raw = [_SHDR.unpack_from(obj, shoff + i * _SHDR.size) for i in range(shnum)]
    names_off = raw[shstrndx][4]

    def name(at: int) -> str:
        end = obj.index(b"\0", names_off + at)
        return obj[names_off + at : end].decode()

    return [_Section(name(s[0]), s[1], s[2], s[4], s[5], s[6], s[7], s[9]) for s in raw]


def _cstr(blob: bytes, at: int) -> str:
    return blob[at : blob.index(b"\0", at)].decode()


def link(obj: bytes, *, entry: str = "entrypoint") -> bytes:
    """Return a loadable Solana program built from the relocatable BPF object ``obj``.

    The object must have one ``.text`` section, no data sections, and only
    ``R_BPF_64_32`` relocations against undefined symbols (syscalls such as
    ``sol_sha256``); calls between our own functions are already resolved by the
    assembler. Raises :class:`LinkError` naming what is unsupported.
    """
    secs = _sections(obj)
    by_name = {s.name: (i, s) for i, s in enumerate(secs)}
    if ".text" not in by_name:
        raise LinkError("object has no .text section")
    text_idx, text = by_name[".text"]
    for s in secs:
        if s.flags & SHF_ALLOC and s.size and s.name != ".text" and not s.name.startswith(".eh_frame"):
            raise LinkError(f"section {s.name} ({s.size} bytes) is not supported: keep the program free of data")
    sym_idx, symtab = by_name[".symtab"]
    strtab = secs[symtab.link]
    syms = [_SYM.unpack_from(obj, symtab.offset + i * _SYM.size) for i in range(symtab.size // _SYM.size)]
    strblob = obj[strtab.offset : strtab.offset + strtab.size]

    entry_off = None
    for st_name, _info, _other, shndx, value, _size in syms:
        if shndx == text_idx and _cstr(strblob, st_name) == entry:
            entry_off = value
    if entry_off is None:
        raise LinkError(f"no {entry!r} symbol in .text")

    # Relocations of .text: every one must be a syscall call site.
    calls: list[tuple[int, str]] = []  # (offset in .text, syscall name)
    for s in secs:
        if s.type == SHT_REL and s.info == text_idx:
            for k in range(s.size // _REL.size):
                r_offset, r_info = _REL.unpack_from(obj, s.offset + k * _REL.size)
                rtype, rsym = r_info & 0xFFFFFFFF, r_info >> 32
                sname = _cstr(strblob, syms[rsym][0])
                if rtype != R_BPF_64_32 or syms[rsym][3] != 0:
                    raise LinkError(f"relocation type {rtype} against {sname!r} at .text+{r_offset:#x} is not a syscall call")
                calls.append((r_offset, sname))
        elif s.type == SHT_REL and secs[s.info].flags & SHF_ALLOC and secs[s.info].name != ".text":
            if not secs[s.info].name.startswith(".eh_frame"):
                raise LinkError(f"relocations for {secs[s.info].name} are not supported")

    code = obj[text.offset : text.offset + text.size]
    names = sorted({n for _, n in calls})
    return _write(code, entry_off, calls, names)


def _align(n: int, a: int = 8) -> int:
    return (n + a - 1) // a * a


def _write(code: bytes, entry_off: int, calls: list[tuple[int, str]], names: list[str]) -> bytes:
    n_phdr = 3
    text_off = _align(_EHDR.size + n_phdr * _PHDR.size)
    # Dynamic symbols: index 0 is the null symbol, then one undefined global per syscall.
    dynstr = b"\0"
    name_at: dict[str, int] = {}
    for n in names:
        name_at[n] = len(dynstr)
        dynstr += n.encode() + b"\0"
    dynsym = _SYM.pack(0, 0, 0, 0, 0, 0) + b"".join(_SYM.pack(name_at[n], 0x10, 0, 0, 0, 0) for n in names)
    sym_index = {n: i + 1 for i, n in enumerate(names)}

    dynsym_off = _align(text_off + len(code))
    dynstr_off = dynsym_off + len(dynsym)
    rel_off = _align(dynstr_off + len(dynstr))
    # r_offset is the call instruction's file offset (= its virtual address here).
    rel = b"".join(_REL.pack(text_off + off, (sym_index[n] << 32) | R_BPF_64_32) for off, n in calls)
    dyn_off = _align(rel_off + len(rel))
    dyn_entries = [(DT_SYMTAB, dynsym_off), (DT_STRTAB, dynstr_off), (DT_STRSZ, len(dynstr)), (DT_SYMENT, _SYM.size)]
    if rel:
        dyn_entries += [(DT_REL, rel_off), (DT_RELSZ, len(rel)), (DT_RELENT, _REL.size), (DT_TEXTREL, 0)]
    dyn_entries.append((DT_NULL, 0))
    dynamic = b"".join(_DYN.pack(t, v) for t, v in dyn_entries)
    shstr = b"\0"
    shname: dict[str, int] = {}
    for n in (".text", ".dynsym", ".dynstr", ".rel.dyn", ".dynamic", ".shstrtab"):
        shname[n] = len(shstr)
        shstr += n.encode() + b"\0"
    shstr_off = dyn_off + len(dynamic)
    shoff = _align(shstr_off + len(shstr))

    # (name, type, flags, addr, offset, size, link, info, align, entsize); index 2 is .dynstr.
    shdrs = [
        ("", 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (".text", 1, SHF_ALLOC | SHF_EXECINSTR, text_off, text_off, len(code), 0, 0, 8, 0),
        (".dynsym", SHT_DYNSYM, SHF_ALLOC, dynsym_off, dynsym_off, len(dynsym), 3, 1, 8, _SYM.size),
        (".dynstr", SHT_STRTAB, SHF_ALLOC, dynstr_off, dynstr_off, len(dynstr), 0, 0, 1, 0),
        (".rel.dyn", SHT_REL, SHF_ALLOC, rel_off, rel_off, len(rel), 2, 0, 8, _REL.size),
        (".dynamic", SHT_DYNAMIC, SHF_ALLOC, dyn_off, dyn_off, len(dynamic), 3, 0, 8, _DYN.size),
        (".shstrtab", SHT_STRTAB, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0),
    ]
    phdrs = [
        (PT_LOAD, PF_R | PF_X, text_off, len(code)),
        (PT_LOAD, PF_R, dynsym_off, dyn_off + len(dynamic) - dynsym_off),
        (PT_DYNAMIC, PF_R, dyn_off, len(dynamic)),
    ]
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    out = bytearray(shoff + len(shdrs) * _SHDR.size)
    _EHDR.pack_into(out, 0, ident, ET_DYN, EM_BPF, 1, text_off + entry_off, _EHDR.size, shoff, 0,
                    _EHDR.size, _PHDR.size, len(phdrs), _SHDR.size, len(shdrs), len(shdrs) - 1)
    for i, (ptype, flags, off, size) in enumerate(phdrs):
        _PHDR.pack_into(out, _EHDR.size + i * _PHDR.size, ptype, flags, off, off, off, size, size, 8)
    for off, blob in ((text_off, code), (dynsym_off, dynsym), (dynstr_off, dynstr), (rel_off, rel),
                      (dyn_off, dynamic), (shstr_off, shstr)):
        out[off : off + len(blob)] = blob
    for i, (n, typ, flags, addr, off, size, lnk, info, align, entsize) in enumerate(shdrs):
        _SHDR.pack_into(out, shoff + i * _SHDR.size, shname.get(n, 0) if n else 0, typ, flags, addr, off, size,
                        lnk, info, align, entsize)
    return bytes(out)
