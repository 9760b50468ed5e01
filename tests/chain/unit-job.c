/*
 * The job framework's state machine with a fake job: transition and verb tables, callback
 * order on success, failure, cancel and prepare failure, manual finalize and dismiss, pause and
 * resume from another thread, READY with complete / soft cancel / hard cancel, and the rate
 * limit arithmetic. Synchronisation is by the job's own status waits, never by sleeping.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>

#include "../unit/t.h"
#include "job/job-int.h"
#include "util/err.h"

struct fake {
    char log[256];
    int steps;        /* pause points in run */
    int fail_run;     /* error returned by run (0 = succeed) */
    int fail_prepare; /* error returned by prepare */
    int pause_at;     /* call ct_job_pause from the progress callback at this step (0 = never) */
    int speed_at;     /* call ct_job_set_speed(4096) at this step */
    bool ready;       /* wait in READY after the steps */
    int ready_ret;
    int ran_steps;
    char statuses[256];
};

static void logf_(struct fake *f, const char *s)
{
    if (f->log[0]) {
        strcat(f->log, ",");
    }
    strcat(f->log, s);
}

static int fake_run(struct ct_job *job, struct ct_err *err)
{
    struct fake *f = job_opaque(job);
    logf_(f, "run");
    job_progress_set_total(job, (uint64_t)f->steps * 10);
    for (int i = 0; i < f->steps; i++) {
        int r = job_pause_point(job);
        if (r < 0) {
            return r;
        }
        f->ran_steps++;
        job_progress_update(job, 10);
    }
    if (f->ready) {
        f->ready_ret = job_ready_wait(job);
        if (f->ready_ret < 0) {
            return f->ready_ret;
        }
    }
    if (f->fail_run) {
        return ct_err_set(err, f->fail_run, "run failed");
    }
    return 0;
}

static int fake_prepare(struct ct_job *job, struct ct_err *err)
{
    struct fake *f = job_opaque(job);
    logf_(f, "prepare");
    if (f->fail_prepare) {
        err->code = f->fail_prepare;
        strcpy(err->msg, "prepare failed");
        return f->fail_prepare;
    }
    return 0;
}

static void fake_commit(struct ct_job *job)
{
    logf_(job_opaque(job), "commit");
}

static void fake_abort(struct ct_job *job)
{
    logf_(job_opaque(job), "abort");
}

static void fake_clean(struct ct_job *job)
{
    logf_(job_opaque(job), "clean");
}

static const struct job_driver fake_driver = {
    .type = "fake",
    .run = fake_run,
    .prepare = fake_prepare,
    .commit = fake_commit,
    .abort = fake_abort,
    .clean = fake_clean,
};

static void on_progress(struct ct_job *job, void *opaque)
{
    struct fake *f = opaque;
    if (f->pause_at && f->ran_steps == f->pause_at) {
        ct_job_pause(job, NULL);
    }
    if (f->speed_at && f->ran_steps == f->speed_at) {
        ct_job_set_speed(job, 4096, NULL);
    }
}

static void on_status(struct ct_job *job, enum ct_job_status s, void *opaque)
{
    struct fake *f = opaque;
    (void)job;
    char c[2] = {"CRPYSWDXEN"[s], 0};
    strcat(f->statuses, c);
}

static struct ct_job *make(struct fake *f, bool manual_fin, bool manual_dis)
{
    struct ct_job *job;
    struct ct_job_opts o = {.id = "j1",
                            .manual_finalize = manual_fin,
                            .manual_dismiss = manual_dis,
                            .progress = on_progress,
                            .on_status = on_status,
                            .opaque = f};
    T_ASSERT(job_create(&job, &fake_driver, f, &o, NULL) == 0, "job_create");
    return job;
}

static void test_tables(void)
{
    T_CHECK(ct_job_transition_allowed(CT_JOB_STATUS_CREATED, CT_JOB_STATUS_RUNNING), "C->R");
    T_CHECK(ct_job_transition_allowed(CT_JOB_STATUS_RUNNING, CT_JOB_STATUS_PAUSED), "R->P");
    T_CHECK(ct_job_transition_allowed(CT_JOB_STATUS_PAUSED, CT_JOB_STATUS_RUNNING), "P->R");
    T_CHECK(ct_job_transition_allowed(CT_JOB_STATUS_READY, CT_JOB_STATUS_STANDBY), "Y->S");
    T_CHECK(ct_job_transition_allowed(CT_JOB_STATUS_PENDING, CT_JOB_STATUS_CONCLUDED), "D->E");
    T_CHECK(!ct_job_transition_allowed(CT_JOB_STATUS_CREATED, CT_JOB_STATUS_CONCLUDED), "C-/->E");
    T_CHECK(!ct_job_transition_allowed(CT_JOB_STATUS_PAUSED, CT_JOB_STATUS_ABORTING), "P-/->X");
    T_CHECK(!ct_job_transition_allowed(CT_JOB_STATUS_CONCLUDED, CT_JOB_STATUS_RUNNING), "E-/->R");
    for (int s = 0; s < CT_JOB_STATUS__MAX; s++) {
        T_CHECK(!ct_job_transition_allowed(CT_JOB_STATUS_NULL, (enum ct_job_status)s),
                "NULL is final (%d)", s);
        T_CHECK(!ct_job_transition_allowed((enum ct_job_status)s, CT_JOB_STATUS_CREATED),
                "nothing goes back to CREATED (%d)", s);
    }
    T_CHECK(ct_job_verb_allowed(CT_JOB_VERB_COMPLETE, CT_JOB_STATUS_READY), "complete in Y");
    T_CHECK(!ct_job_verb_allowed(CT_JOB_VERB_COMPLETE, CT_JOB_STATUS_RUNNING), "no complete in R");
    T_CHECK(ct_job_verb_allowed(CT_JOB_VERB_CANCEL, CT_JOB_STATUS_PENDING), "cancel in D");
    T_CHECK(!ct_job_verb_allowed(CT_JOB_VERB_CANCEL, CT_JOB_STATUS_CONCLUDED), "no cancel in E");
    T_CHECK(ct_job_verb_allowed(CT_JOB_VERB_DISMISS, CT_JOB_STATUS_CONCLUDED), "dismiss in E");
    T_CHECK(ct_job_verb_allowed(CT_JOB_VERB_FINALIZE, CT_JOB_STATUS_PENDING), "finalize in D");
    T_CHECK(!strcmp(ct_job_status_name(CT_JOB_STATUS_STANDBY), "standby"), "names");
    T_CHECK(!strcmp(ct_job_verb_name(CT_JOB_VERB_SET_SPEED), "set-speed"), "verb names");
}

static void test_success(void)
{
    struct fake f = {.steps = 5};
    struct ct_job *job = make(&f, false, false);
    T_CHECK(!strcmp(ct_job_id(job), "j1") && !strcmp(ct_job_type(job), "fake"), "id/type");
    struct ct_err err = {0};
    T_CHECK(ct_job_complete(job, &err) == -CT_E_STATE, "complete refused while CREATED");
    T_CHECK(ct_job_run(job, &err) == 0, "run: %s", err.msg);
    T_CHECK(!strcmp(f.log, "run,prepare,commit,clean"), "order: %s", f.log);
    T_CHECK(!strcmp(f.statuses, "RWDEN"), "statuses: %s", f.statuses);
    T_CHECK(ct_job_get_status(job) == CT_JOB_STATUS_NULL, "auto-dismissed");
    uint64_t d, t;
    ct_job_progress(job, &d, &t);
    T_CHECK(d == 50 && t == 50, "progress %llu/%llu", (unsigned long long)d, (unsigned long long)t);
    T_CHECK(ct_job_run(job, &err) == -CT_E_STATE, "run twice refused");
    ct_job_free(job);
}

static void test_failure(void)
{
    struct fake f = {.steps = 3, .fail_run = -EIO};
    struct ct_job *job = make(&f, false, true);
    struct ct_err err = {0};
    T_CHECK(ct_job_run(job, &err) == -EIO && err.code == -EIO, "run fails with EIO");
    T_CHECK(!strcmp(f.log, "run,abort,clean"), "order: %s", f.log);
    T_CHECK(!strcmp(f.statuses, "RXE"), "statuses: %s", f.statuses);
    T_CHECK(ct_job_get_status(job) == CT_JOB_STATUS_CONCLUDED, "stays concluded");
    T_CHECK(ct_job_result(job, NULL) == -EIO, "result");
    T_CHECK(ct_job_dismiss(job, &err) == 0 && ct_job_get_status(job) == CT_JOB_STATUS_NULL,
            "dismiss");
    T_CHECK(ct_job_dismiss(job, &err) == -CT_E_STATE, "second dismiss refused");
    ct_job_free(job);

    struct fake g = {.steps = 1, .fail_prepare = -ENOSPC};
    job = make(&g, false, false);
    T_CHECK(ct_job_run(job, &err) == -ENOSPC && !strcmp(err.msg, "prepare failed"),
            "prepare failure is the result: %s", err.msg);
    T_CHECK(!strcmp(g.log, "run,prepare,abort,clean"), "order: %s", g.log);
    T_CHECK(!strcmp(g.statuses, "RWDXEN"), "statuses: %s", g.statuses);
    ct_job_free(job);
}

static void test_manual_finalize(void)
{
    struct fake f = {.steps = 2};
    struct ct_job *job = make(&f, true, true);
    struct ct_err err = {0};
    T_CHECK(ct_job_run(job, &err) == 0, "run");
    T_CHECK(ct_job_get_status(job) == CT_JOB_STATUS_PENDING, "waits in PENDING");
    T_CHECK(!strcmp(f.log, "run"), "nothing finalized yet: %s", f.log);
    T_CHECK(ct_job_pause(job, &err) == -CT_E_STATE, "pause refused in PENDING");
    T_CHECK(ct_job_finalize(job, &err) == 0, "finalize");
    T_CHECK(!strcmp(f.log, "run,prepare,commit,clean"), "order: %s", f.log);
    T_CHECK(ct_job_get_status(job) == CT_JOB_STATUS_CONCLUDED, "concluded");
    T_CHECK(ct_job_finalize(job, &err) == -CT_E_STATE, "finalize twice refused");
    ct_job_free(job);

    struct fake g = {.steps = 2};
    job = make(&g, true, false);
    T_CHECK(ct_job_run(job, &err) == 0, "run");
    T_CHECK(ct_job_cancel(job, false, &err) == 0, "cancel in PENDING");
    T_CHECK(!strcmp(g.log, "run,abort,clean"), "cancel in pending aborts: %s", g.log);
    T_CHECK(ct_job_result(job, NULL) == -ECANCELED, "result is ECANCELED");
    T_CHECK(ct_job_get_status(job) == CT_JOB_STATUS_NULL, "dismissed");
    ct_job_free(job);
}

static void test_cancel_before_start(void)
{
    struct fake f = {.steps = 2};
    struct ct_job *job = make(&f, false, false);
    T_CHECK(ct_job_cancel(job, true, NULL) == 0, "cancel in CREATED");
    T_CHECK(ct_job_run(job, NULL) == -ECANCELED, "run reports the cancel");
    T_CHECK(!strcmp(f.log, "abort,clean"), "run never called: %s", f.log);
    ct_job_free(job);
    /* Never started: free is fine. */
    struct fake g = {0};
    ct_job_free(make(&g, false, false));
}

struct helper {
    struct ct_job *job;
    int mode; /* 0: resume after pause; 1: cancel while paused; 2: complete READY;
                 3: pause in READY then soft cancel; 4: hard cancel in READY */
    int ok;
};

static void *helper_main(void *arg)
{
    struct helper *h = arg;
    struct ct_job *job = h->job;
    unsigned paused = 1u << CT_JOB_STATUS_PAUSED, ready = 1u << CT_JOB_STATUS_READY;
    unsigned standby = 1u << CT_JOB_STATUS_STANDBY;
    switch (h->mode) {
    case 0:
        h->ok = ct_job_wait_status(job, paused) == CT_JOB_STATUS_PAUSED && ct_job_is_paused(job);
        h->ok &= ct_job_resume(job, NULL) == 0;
        h->ok &= ct_job_resume(job, NULL) == -CT_E_STATE; /* not paused any more */
        break;
    case 1:
        h->ok = ct_job_wait_status(job, paused) == CT_JOB_STATUS_PAUSED;
        h->ok &= ct_job_cancel(job, true, NULL) == 0;
        break;
    case 2:
        h->ok = ct_job_wait_status(job, ready) == CT_JOB_STATUS_READY;
        h->ok &= ct_job_complete(job, NULL) == 0;
        break;
    case 3:
        h->ok = ct_job_wait_status(job, ready) == CT_JOB_STATUS_READY;
        h->ok &= ct_job_pause(job, NULL) == 0;
        h->ok &= ct_job_wait_status(job, standby) == CT_JOB_STATUS_STANDBY;
        h->ok &= ct_job_complete(job, NULL) == -CT_E_STATE; /* not while standby */
        h->ok &= ct_job_cancel(job, false, NULL) == 0;
        h->ok &= ct_job_resume(job, NULL) == 0;
        break;
    case 4:
        h->ok = ct_job_wait_status(job, ready) == CT_JOB_STATUS_READY;
        h->ok &= ct_job_cancel(job, true, NULL) == 0;
        break;
    }
    return NULL;
}

static int run_with_helper(struct fake *f, int mode, struct ct_err *err, struct ct_job **jobp)
{
    struct ct_job *job = make(f, false, true);
    struct helper h = {.job = job, .mode = mode};
    pthread_t th;
    pthread_create(&th, NULL, helper_main, &h);
    int r = ct_job_run(job, err);
    pthread_join(th, NULL);
    T_CHECK(h.ok, "helper checks (mode %d)", mode);
    *jobp = job;
    return r;
}

static void test_pause_resume_threads(void)
{
    struct ct_err err = {0};
    struct ct_job *job;
    struct fake f = {.steps = 6, .pause_at = 2};
    T_CHECK(run_with_helper(&f, 0, &err, &job) == 0, "paused job resumed and finished");
    T_CHECK(f.ran_steps == 6, "all steps ran: %d", f.ran_steps);
    T_CHECK(strstr(f.statuses, "RPR") != NULL, "went through PAUSED: %s", f.statuses);
    ct_job_free(job);

    struct fake g = {.steps = 6, .pause_at = 3};
    T_CHECK(run_with_helper(&g, 1, &err, &job) == -ECANCELED, "cancel while paused");
    T_CHECK(g.ran_steps == 3, "stopped at the pause point: %d", g.ran_steps);
    T_CHECK(!strcmp(g.log, "run,abort,clean"), "order: %s", g.log);
    ct_job_free(job);

    struct fake s = {.steps = 4, .speed_at = 1};
    job = make(&s, false, true);
    T_CHECK(ct_job_run(job, &err) == 0, "run with speed change");
    T_CHECK(ct_job_speed(job) == 4096, "speed changed while running");
    T_CHECK(ct_job_set_speed(job, 1, &err) == -CT_E_STATE, "no speed change once concluded");
    ct_job_free(job);
}

static void test_ready(void)
{
    struct ct_err err = {0};
    struct ct_job *job;
    struct fake f = {.steps = 2, .ready = true};
    T_CHECK(run_with_helper(&f, 2, &err, &job) == 0 && f.ready_ret == 0, "complete from READY");
    T_CHECK(!strcmp(f.statuses, "RYWDE"), "statuses: %s", f.statuses);
    ct_job_free(job);

    struct fake g = {.steps = 2, .ready = true};
    T_CHECK(run_with_helper(&g, 3, &err, &job) == 0 && g.ready_ret == 1,
            "soft cancel in READY finishes without switch-over (%d)", g.ready_ret);
    T_CHECK(strstr(g.statuses, "YSY") != NULL, "went through STANDBY: %s", g.statuses);
    T_CHECK(!strcmp(g.log, "run,prepare,commit,clean"), "order: %s", g.log);
    ct_job_free(job);

    struct fake h = {.steps = 1, .ready = true};
    T_CHECK(run_with_helper(&h, 4, &err, &job) == -ECANCELED, "hard cancel in READY");
    T_CHECK(!strcmp(h.log, "run,abort,clean"), "order: %s", h.log);
    ct_job_free(job);
}

static void test_ratelimit(void)
{
    struct job_ratelimit rl = {0};
    const uint64_t ms = 1000000;
    T_CHECK(job_ratelimit_delay(&rl, 0, 0, 1u << 30) == 0, "speed 0 = unlimited");
    memset(&rl, 0, sizeof(rl));
    /* 1 MB/s: 100 kB per 100 ms slice. */
    T_CHECK(job_ratelimit_delay(&rl, 1000000, 1, 50000) == 0, "within quota");
    T_CHECK(job_ratelimit_delay(&rl, 1000000, 2, 50000) == 0, "exactly the quota");
    uint64_t d = job_ratelimit_delay(&rl, 1000000, 3, 100000);
    /* 200 kB sent at once at 1 MB/s: the next request may go 200 ms after the first. */
    T_CHECK(d >= 190 * ms && d <= 200 * ms, "two slices used: %llu ns", (unsigned long long)d);
    memset(&rl, 0, sizeof(rl));
    d = job_ratelimit_delay(&rl, 1000000, 1, 1000000);
    T_CHECK(d >= 900 * ms && d <= 1000 * ms, "1 MB at 1 MB/s waits ~1 s: %llu",
            (unsigned long long)d);
    /* A later request after the wait starts a fresh slice. */
    T_CHECK(job_ratelimit_delay(&rl, 1000000, 1 + d + 200 * ms, 1000) == 0, "fresh slice");
}

int main(void)
{
    test_tables();
    test_success();
    test_failure();
    test_manual_finalize();
    test_cancel_before_start();
    test_pause_resume_threads();
    test_ready();
    test_ratelimit();
    return t_done();
}
