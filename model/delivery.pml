/*
 * The execution kernel's delivery protocol, for the SPIN model checker (docs/reliability.md).
 *
 * One job of N items; two daemons, each with a window of WIN provider calls. A daemon claims
 * the job (taking a lease). Its steps are worker_step: one fenced transaction (it must hold the
 * lease) that first records the outcomes the daemon holds, then dispatches items up to the
 * window, counting the calls still waiting for an answer against it. The calls run outside any
 * transaction, in any order, while further steps run. Anything may go wrong where it can in
 * the real thing: a daemon crashes at any moment (its calls in flight may still reach the
 * provider) and comes back as a new daemon; a live daemon pauses past its lease (GC, SIGSTOP);
 * a step's connection drops after the commit, before its answer came (the daemon keeps the
 * outcomes it sent to be recorded and records them again; it never learns what the step
 * dispatched, so it calls undispatch_items with what it did hand out). Whoever claims a job
 * whose lease expired first recovers the items left dispatched without an outcome: `unknown`
 * for a provider that cannot deduplicate (SMTP, Twilio), sent again under the same idempotency
 * key for one that can (webhook).
 *
 * Checked (tests/unit/test_model.py runs every case, exhaustively):
 *   safety (pan -DSAFETY -DNOCLAIM): no contact receives a message twice (what the provider
 *     delivered, per item); `sent` is recorded only for a delivered message; a terminal item
 *     never changes; dispatched-and-unrecorded items never exceed the window; when every
 *     daemon is done the job is done and every item terminal, and with a deduplicating
 *     provider every item ends `sent`;
 *   liveness under weak fairness (pan -a -f, the ltl claim job_ends): the job always ends.
 * Mutants show the model can fail: -DNO_FENCING (writes skip the lease check: a daemon whose
 * lease was taken dispatches and sends an item its successor is sending), -DRESEND_UNKNOWN
 * (recovery re-sends what a non-deduplicating provider may have delivered) and
 * -DDISPATCH_BEFORE_RECORD (a step dispatches before it records the outcomes it carries, so
 * answered calls do not count against the window: more than WIN dispatched and unrecorded).
 *
 * The steps mirror the kernel's: the claim and its recovery are worker_step's claim
 * (_claim_jobs, recover), a step its results then its step 6 (dispatch), undispatch_items the
 * call after a lost connection, the completion _end_job. The daemon's pipelining (a second step
 * sent before the first is answered, its window share reserved) is not modeled: a step here
 * is answered before the next is sent.
 */

#ifndef N
#define N 2
#endif
#ifndef WIN
#define WIN 1
#endif
#define W 2
#define CRASHES 1   /* per daemon */
#define PAUSES 1    /* a live lease holder pausing past its lease, in all */
#define BLIPS 1     /* lost answers of a step, per daemon */

mtype = { PENDING, SENT, UNKNOWN };

mtype status[N];
bool dispatched[N];   /* handed to the provider, no outcome recorded yet */
byte delivered[N];    /* messages the provider really delivered for the item */

byte holder = 0;      /* the daemon incarnation holding the job's lease; 0: none */
bool lease = false;   /* the holder's lease has not expired */
bool holder_dead = false;
byte incarnations = 0;
byte pauses = 0;
bool job_done = false;
byte finished = 0;

#ifdef NO_FENCING
#define HOLDS(me) (true)
#else
#define HOLDS(me) (holder == me && lease)
#endif

/* An item, as one hold of the job by one daemon sees it (the daemon's HeldJob). */
#define FREE 0       /* not handed out in this hold */
#define CALLING 1    /* handed to a provider thread, no answer yet */
#define ANSWERED 2   /* answered: the outcome is kept until a step records it */
#define DONE 3       /* recorded, or dropped with a lost job */

/* The provider receives a message: once per item, unless a bug sends it twice. */
#define DELIVER(i) \
    if \
    :: DEDUPLICATES && delivered[i] > 0 -> skip   /* a key it has seen: not delivered again */ \
    :: else -> delivered[i]++ \
    fi; \
    assert(delivered[i] <= 1)

#ifdef DEDUP
#define DEDUPLICATES true
#else
#define DEDUPLICATES false
#endif

/* Options and conditions over every item (SPIN has no loop in a guard). */
#define ANSWER(k) :: atomic { phase[k] == CALLING -> DELIVER(k); phase[k] = ANSWERED }
#define ARRIVE(k) :: atomic { orphan[k] -> DELIVER(k); orphan[k] = false }
#define IS_CALLING(k) (phase[k] == CALLING)
#define IS_ANSWERED(k) (phase[k] == ANSWERED)
#define IS_BUSY(k) (phase[k] == CALLING || phase[k] == ANSWERED)
#define IS_OPEN(k) (status[k] == PENDING && !dispatched[k])
#if N > 2
#define SOME(p) (p(0) || p(1) || p(2))
#define COUNT(p) (p(0) + p(1) + p(2))
#elif N > 1
#define SOME(p) (p(0) || p(1))
#define COUNT(p) (p(0) + p(1))
#else
#define SOME(p) (p(0))
#define COUNT(p) (p(0))
#endif

/* Dispatched-and-unrecorded, in the database: never more than one daemon's window. */
#define IS_UNRECORDED(k) (status[k] == PENDING && dispatched[k])
#define IS_PENDING(k) (status[k] == PENDING)
#define WINDOW_HOLDS assert(COUNT(IS_UNRECORDED) <= WIN)

/* Leases run out: always, eventually, for a dead holder; PAUSES times for a live one. */
active proctype clock() {
end:
    do
    :: atomic { lease && holder_dead -> lease = false }
    :: atomic { lease && !holder_dead && pauses < PAUSES -> pauses++; lease = false }
    od
}

proctype daemon() {
    byte me, i, n, crashes = 0, blips = 0;
    bool answer_lost = false, held, cut;
    byte phase[N];    /* this hold's view of each item */
    bool fresh[N];    /* dispatched by the step now running */
    bool orphan[N];   /* a call of a hold that is over (lost job, crashed incarnation): it may
                         still reach the provider, its outcome is never recorded */

incarnate:
    atomic {
        incarnations++; me = incarnations;
        answer_lost = false;
        for (i : 0 .. N-1) {
            if
            :: phase[i] == CALLING -> orphan[i] = true   /* a request already on its way */
            :: else -> skip
            fi;
            phase[i] = FREE
        }
    }

claim:
    do
    ARRIVE(0)
#if N > 1
    ARRIVE(1)
#endif
#if N > 2
    ARRIVE(2)
#endif
    :: job_done -> goto done
    :: atomic {
        !job_done && (holder == 0 || !lease) ->
            holder = me; lease = true; holder_dead = false;
            /* a new hold: a new HeldJob, nothing handed out in it yet */
            for (i : 0 .. N-1) { phase[i] = FREE };
            /* recover what an earlier holder dispatched without recording an outcome */
            for (i : 0 .. N-1) {
                if
                :: status[i] == PENDING && dispatched[i] ->
#if defined(DEDUP) || defined(RESEND_UNKNOWN)
                    dispatched[i] = false   /* sent again under the same idempotency key */
#else
                    status[i] = UNKNOWN; dispatched[i] = false
#endif
                :: else -> skip
                fi
            }
        }; break
    od;

work:
    do
    /* a provider call answers (any of them, in any order), outside any transaction */
    ANSWER(0)
#if N > 1
    ANSWER(1)
#endif
#if N > 2
    ANSWER(2)
#endif
    ARRIVE(0)
#if N > 1
    ARRIVE(1)
#endif
#if N > 2
    ARRIVE(2)
#endif

    /* connected again after a lost answer: give back what this hold never handed out */
    :: atomic {
        answer_lost ->
            if
            :: HOLDS(me) ->
                for (i : 0 .. N-1) {
                    if
                    :: status[i] == PENDING && dispatched[i] && phase[i] == FREE -> dispatched[i] = false
                    :: else -> skip
                    fi
                }
            :: else -> skip
            fi;
            answer_lost = false
        }

    /* a step: only when it has something to record, or room and an item to dispatch */
    :: atomic {
        !answer_lost && (SOME(IS_ANSWERED) || (SOME(IS_OPEN) && COUNT(IS_CALLING) < WIN)) ->
            held = HOLDS(me);
#ifndef DISPATCH_BEFORE_RECORD
            /* the outcomes first, fenced: a terminal row never changes */
            for (i : 0 .. N-1) {
                if
                :: phase[i] == ANSWERED && held && status[i] == PENDING ->
                    assert(delivered[i] >= 1);
                    status[i] = SENT; dispatched[i] = false
                :: else -> skip
                fi
            };
#endif
            /* then dispatch, up to the window: calls without an answer count against it */
            n = COUNT(IS_CALLING);
            cut = false;
            for (i : 0 .. N-1) {
                fresh[i] = false;
                if
                :: held && !cut && n < WIN && status[i] == PENDING && !dispatched[i] ->
                    dispatched[i] = true; fresh[i] = true; n++;
                    if
                    :: true -> skip
                    :: true -> cut = true   /* the provider's rate tokens ran out: the rest waits */
                    fi
                :: else -> skip
                fi
            };
            WINDOW_HOLDS;
#ifdef DISPATCH_BEFORE_RECORD
            for (i : 0 .. N-1) {
                if
                :: phase[i] == ANSWERED && held && status[i] == PENDING ->
                    assert(delivered[i] >= 1);
                    status[i] = SENT; dispatched[i] = false
                :: else -> skip
                fi
            };
#endif
            /* the answer comes, or the connection drops after the commit */
            if
            :: blips < BLIPS -> blips++; answer_lost = true   /* outcomes kept, fresh unknown */
            :: true -> skip
            fi;
            for (i : 0 .. N-1) {
                if
                :: answer_lost -> skip
                :: !answer_lost && held && phase[i] == ANSWERED -> phase[i] = DONE
                :: !answer_lost && held && fresh[i] -> phase[i] = CALLING
                :: !answer_lost && !held && phase[i] == CALLING -> orphan[i] = true; phase[i] = FREE
                :: else -> skip
                fi;
                fresh[i] = false
            };
            n = 0; cut = false;   /* scratch values: cleared, so they do not split states */
            if
            :: !answer_lost && !held -> held = false; goto claim   /* the job is lost: fenced, nothing recorded */
            :: else -> held = false
            fi
        }

    /* nothing in flight, nothing to dispatch: complete the job (fenced, every item terminal) */
    :: atomic {
        !answer_lost && !SOME(IS_BUSY) && (!SOME(IS_OPEN) || !HOLDS(me)) ->
            if
            :: HOLDS(me) && !SOME(IS_PENDING) -> job_done = true; holder = 0; lease = false; goto claim
            :: else -> goto claim   /* not its job any more */
            fi
        }

    :: crashes < CRASHES -> crashes++; goto crash
    od;

crash:
    atomic {
        if
        :: holder == me -> holder_dead = true
        :: else -> skip
        fi
    }
    goto incarnate

done:
    /* its calls still on their way arrive before it stops */
    do
    ARRIVE(0)
#if N > 1
    ARRIVE(1)
#endif
#if N > 2
    ARRIVE(2)
#endif
    :: else -> break
    od;
    finished++
}

/* Liveness, under weak fairness (pan -a -f): the job always ends. */
ltl job_ends { <> job_done }

init {
    byte i;
    atomic {
        for (i : 0 .. N-1) { status[i] = PENDING };
        for (i : 0 .. W-1) { run daemon() }
    }
    finished == W;
    assert(job_done);
    for (i : 0 .. N-1) {
        assert(status[i] != PENDING && !dispatched[i]);
        assert(status[i] != SENT || delivered[i] == 1);
#ifdef DEDUP
        assert(status[i] == SENT);
#endif
    }
}
