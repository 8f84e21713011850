/*
 * On-disk constants of the walstate WAL, shared by writer and reader.
 * The specification is docs/FORMAT.md; change the two together and bump
 * WAL_FORMAT_VERSION when the bytes change.
 *
 *   segment  := seg_header record* zero-fill
 *   seg_header (64 bytes, little endian):
 *     0  magic "WALSTSEG"     8  version u32     12 header_size u32 (=64)
 *     16 system_id u64        24 first_lsn u64   32 nonce u64 (random)
 *     40 segment_size u64     48 prev_lsn u64 (last LSN before this segment)
 *     56 reserved[4]=0        60 crc32c(bytes 0..60) u32
 *   record (28-byte header + payload, packed, no alignment):
 *     0  crc u32  = crc32c(bytes 4..28 || payload), seeded with the segment
 *                   header's crc (the "salt": binds the record to its segment)
 *     4  length u32 (payload bytes)      8  lsn u64
 *     16 synced_lsn u64 (durable LSN known when the record was written)
 *     24 type u8 (0 invalid; bit 0x80 = safe to ignore)   25 reserved[3]=0
 */
#ifndef WALSTATE_WAL_FORMAT_H
#define WALSTATE_WAL_FORMAT_H

#define WAL_FORMAT_VERSION 1u
#define WAL_SEG_MAGIC "WALSTSEG"
#define WAL_SEG_MAGIC_LEN 8
#define WAL_SEG_HDR_SIZE 64u
#define WAL_SEG_HDR_CRC_OFF 60u
#define WAL_REC_HDR_SIZE 28u
#define WAL_REC_MAX_PAYLOAD (1u << 30) /* 1 GiB: a batch of many 64 MiB values is refused */
#define WAL_SEG_SUFFIX ".seg"
#define WAL_SEG_NAME_LEN 20 /* 16 hex digits of first_lsn + ".seg" */
#define WAL_LAST_NAME "LAST"  /* 16 hex digits + newline: newest segment's first LSN */

/* wal/END, the end hint of a clean close (layout in wal_endhint.c, docs/FORMAT.md) */
#define WAL_END_NAME "END"
#define WAL_END_MAGIC "WALSTEND"
#define WAL_END_VERSION 1u
#define WAL_END_HDR_SIZE 64u
#define WAL_END_MARKS 64u          /* known record positions kept per segment */
#define WAL_END_TAIL_CHECK 8192u   /* zero bytes checked after the hinted end */

/* Record types. Payload encodings are in docs/FORMAT.md ("Payloads"). */
#define WAL_TYPE_PUT 1u
#define WAL_TYPE_DELETE 2u
#define WAL_TYPE_BATCH 3u
#define WAL_TYPE_IGNORABLE 0x80u /* readers that do not know such a type skip it */
#define WAL_TYPE_NOOP 0x80u
#define WAL_TYPE_SHUTDOWN 0x81u /* ignorable, empty: a clean close (no LSN handed out after it) */
#define WAL_TYPE_SESSION 0x82u  /* ignorable, empty: a writable session began (synced first) */

/* Payloads (docs/FORMAT.md, "Payloads"):
 *   PUT    = u16 key length | key | value
 *   DELETE = key
 *   BATCH  = u32 count, then per operation u8 op | u16 key length |
 *            u32 value length (0 for a delete) | key | value */
#define WAL_PUT_HDR_SIZE 2u      /* the u16 key length */
#define WAL_BATCH_HDR_SIZE 4u    /* the u32 count */
#define WAL_BATCH_OP_HDR_SIZE 7u /* op, key length, value length */
#define WAL_BATCH_OP_PUT 1u
#define WAL_BATCH_OP_DELETE 2u

/* The engine's limits (docs/FORMAT.md): keys 1..WAL_MAX_KEY bytes (LMDB's
 * key limit), values at most WAL_MAX_VALUE bytes; a whole record's payload
 * (a batch) at most WAL_REC_MAX_PAYLOAD. */
#define WAL_MAX_KEY 511u
#define WAL_MAX_VALUE (64u * 1024u * 1024u) /* 64 MiB */

#endif
