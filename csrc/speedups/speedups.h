/* Declarations shared by the files of walstate._speedups (csrc/speedups/):
 * module.c, hot.c (Hot), batch.c (BatchOps, encode_batch), replay.c (Replay),
 * sort.c (sorted_items). */
#ifndef WALSTATE_SPEEDUPS_H
#define WALSTATE_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "wal_format.h"

/* Every size and limit (WAL_MAX_KEY, WAL_REC_HDR_SIZE, WAL_BATCH_OP_HDR_SIZE,
 * ...) comes from wal_format.h; module.c exposes them as module constants. */

extern PyTypeObject HotType;      /* hot.c */
extern PyTypeObject BatchOpsType; /* batch.c */
extern PyTypeObject ReplayType;   /* replay.c */
/* batch.c: encode_batch(ops) -> the BATCH payload */
PyObject *sp_encode_batch(PyObject *self, PyObject *ops);
/* sort.c: sorted_items(table) -> its items in key order */
PyObject *sp_sorted_items(PyObject *self, PyObject *table);

/* module.c: the arguments of a METH_FASTCALL | METH_KEYWORDS call with keywords
 * (kwnames not NULL), by position: out[0..nnames) gets args[0..nargs), then
 * each keyword's value at its name's place in names; the first nrequired must
 * be given, the rest are NULL where they were not. 0, or -1 with TypeError set
 * (naming fname() and the keyword): an unknown keyword, an argument given twice
 * or missing, more than nnames. The positional-only calls never come here. */
int sp_kwargs(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              const char *const *names, Py_ssize_t nnames, Py_ssize_t nrequired,
              PyObject **out);

#endif
