/* The messages for the WAL's return codes (wal.h). */
#include <string.h>

#include "wal.h"

const char *wal_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "success";
    case WAL_ECORRUPT:
        return "invalid WAL data followed by valid records (corruption)";
    case WAL_EMISMATCH:
        return "WAL segment belongs to another data directory (system_id)";
    case WAL_EVERSION:
        return "unknown WAL format version";
    case WAL_EGAP:
        return "the WAL does not reach back to the requested LSN (gap)";
    case WAL_ETORN:
        return "the last WAL segment ends in a torn record; cut it first";
    case WAL_EPOISONED:
        return "an earlier write or fdatasync failed; the log accepts nothing until reopened";
    case WAL_ETOOBIG:
        return "record payload above the 1 GiB limit";
    case WAL_EINVAL:
        return "invalid argument";
    case WAL_EAGAIN:
        return "the append would wait or do I/O";
    case WAL_ESHORT:
        return "the newest WAL segment is shorter than its header records (cut short by a "
               "copy or a truncate: records may be missing)";
    default:
        return rc < 0 && rc > -1000 ? strerror(-rc) : "unknown error";
    }
}
