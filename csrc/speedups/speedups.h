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

/* Engine limits (walstate/codec.py); anything outside goes to the Python path,
 * which raises the error naming the limit. */
#define MAX_KEY 511
#define MAX_VALUE (64 * 1024 * 1024)

extern PyTypeObject HotType;      /* hot.c */
extern PyTypeObject BatchOpsType; /* batch.c */
extern PyTypeObject ReplayType;   /* replay.c */
/* batch.c: encode_batch(ops) -> the BATCH payload */
PyObject *sp_encode_batch(PyObject *self, PyObject *ops);
/* sort.c: sorted_items(table) -> its items in key order */
PyObject *sp_sorted_items(PyObject *self, PyObject *table);

#endif
