/* The next segment's file, made ahead by a preparer thread once the current
 * segment is half full, so that a rotation does not write a whole segment of
 * zeros while every writer waits (docs/FORMAT.md, "WAL segment"). The file is
 * a zero-filled, fsynced spare-*.tmp with no header (seg_spare_make); the
 * rotation gives it its header and its name (seg_create_from_spare). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <unistd.h>

#include "wal_internal.h"

/* The preparer thread: makes the next segment's file whenever asked. */
static void *prep_main(void *arg)
{
    wal_t *w = arg;
    h_untracked_thread();
    pthread_mutex_lock(&w->mu);
    while (!w->prep_stop) {
        if (w->prep_state != PREP_WANTED) {
            pthread_cond_wait(&w->prep_cv, &w->mu);
            continue;
        }
        w->prep_state = PREP_BUSY;
        uint64_t size = w->segment_size;
        char path[WAL_PATH_MAX + 64];
        pthread_mutex_unlock(&w->mu);
        int fd = seg_spare_make(w->dir, size, path, sizeof path);
        pthread_mutex_lock(&w->mu);
        w->prep_state = PREP_IDLE;
        if (fd >= 0 && w->next_fd < 0 && !w->prep_stop) {
            w->next_fd = fd;
            w->next_size = size;
            memcpy(w->next_path, path, sizeof w->next_path);
        } else if (fd >= 0) {
            close(fd);
            unlink(path);
        }
        /* A spare that failed (full disk, EIO, even after its space was
         * granted) is removed by seg_spare_make and poisons nothing: no record
         * is in it and nothing acknowledged depends on it. The log's own
         * blocks are covered by the log's own fdatasync, which reports their
         * failure to the writer waiting for it; the rotation then creates the
         * segment itself, in the foreground, and reports what fails there. */
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Requires mu. Asks for the next segment's file once the current one is half
 * full (not while a test injects faults: its counts are the foreground's). */
void wal_prepare_next(wal_t *w)
{
    if (w->next_fd >= 0 || w->prep_state == PREP_WANTED || w->prep_state == PREP_BUSY ||
        w->prep_state == PREP_OFF || (w->file_off + w->buf_len) * 2 < w->seg_alloc ||
        h_faults_armed())
        return;
    if (w->prep_state == PREP_NONE) {
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        int rc = pthread_create(&w->prep, &a, prep_main, w);
        pthread_attr_destroy(&a);
        if (rc != 0) {
            w->prep_state = PREP_OFF; /* rotations create segments themselves */
            return;
        }
    }
    w->prep_state = PREP_WANTED;
    pthread_cond_signal(&w->prep_cv);
}

/* Stops the preparer and removes an unused file it made. mu not held. */
void wal_prep_shutdown(wal_t *w)
{
    pthread_mutex_lock(&w->mu);
    int started = w->prep_state != PREP_NONE && w->prep_state != PREP_OFF;
    w->prep_stop = 1;
    pthread_cond_signal(&w->prep_cv);
    pthread_mutex_unlock(&w->mu);
    if (started)
        pthread_join(w->prep, NULL);
    if (w->next_fd >= 0) {
        close(w->next_fd);
        unlink(w->next_path); /* best effort; wal_open removes *.tmp leftovers */
        w->next_fd = -1;
    }
}
