/* Records: the one encoder (the writer's append) and the one parser (the
 * reader, the writer's open scanning for the end, the END hint's check).
 * Layout in wal_format.h and docs/FORMAT.md ("Record"). */
#include "wal_internal.h"

int rec_parse(const uint8_t *buf, size_t len, size_t off, uint32_t salt, wal_record_t *rec)
{
    if (off > len || len - off < WAL_REC_HDR_SIZE)
        return 0;
    const uint8_t *p = buf + off;
    uint32_t plen = get32(p + 4);
    if (plen > WAL_REC_MAX_PAYLOAD || (uint64_t)plen > len - off - WAL_REC_HDR_SIZE)
        return 0;
    uint64_t lsn = get64(p + 8), synced = get64(p + 16);
    if (lsn == 0 || synced >= lsn || p[24] == 0 || (p[25] | p[26] | p[27]) != 0)
        return 0;
    if (wal_crc32c(salt, p + 4, WAL_REC_HDR_SIZE - 4 + (size_t)plen) != get32(p))
        return 0;
    rec->lsn = lsn;
    rec->synced_lsn = synced;
    rec->type = p[24];
    rec->len = plen;
    rec->payload = p + WAL_REC_HDR_SIZE;
    rec->offset = off;
    return 1;
}

void rec_encode(uint8_t *r, uint32_t salt, unsigned type, uint64_t lsn, uint64_t synced_lsn,
                const wal_piece_t *pc, int npc, size_t plen)
{
    put32(r + 4, (uint32_t)plen);
    put64(r + 8, lsn);
    put64(r + 16, synced_lsn);
    r[24] = (uint8_t)type;
    r[25] = r[26] = r[27] = 0;
    uint8_t *q = r + WAL_REC_HDR_SIZE;
    for (int i = 0; i < npc; i++) {
        if (pc[i].n)
            memcpy(q, pc[i].p, pc[i].n);
        q += pc[i].n;
    }
    put32(r, wal_crc32c(salt, r + 4, WAL_REC_HDR_SIZE - 4 + plen));
}
