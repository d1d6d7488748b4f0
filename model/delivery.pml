/*
 * The execution kernel's delivery protocol, for the SPIN model checker (docs/reliability.md).
 *
 * One job of N items; W daemons. A daemon claims the job (taking a lease), dispatches each
 * item (a fenced write: it must hold the lease), calls the provider outside any transaction,
 * then records the outcome (fenced again). Anything may go wrong where it can in the real
 * thing: a daemon crashes before or after a provider call and comes back as a new daemon; a
 * live daemon pauses past its lease (GC, SIGSTOP); its database connection drops before it
 * records (it keeps the outcome and records it once connected again). Whoever claims a job
 * whose lease expired first recovers the items left dispatched without an outcome: `unknown`
 * for a provider that cannot deduplicate (SMTP, Twilio), sent again under the same
 * idempotency key for one that can (webhook).
 *
 * Checked (tests/unit/test_model.py runs every case, exhaustively):
 *   safety (pan -DSAFETY -DNOCLAIM): no contact receives a message twice (what the provider
 *     delivered, per item); `sent` is recorded only for a delivered message; a terminal item
 *     never changes; when every daemon is done the job is done and every item terminal, and
 *     with a deduplicating provider every item ends `sent`;
 *   liveness under weak fairness (pan -a -f, the ltl claim job_ends): the job always ends.
 * Mutants show the model can fail: -DNO_FENCING (writes skip the lease check: a daemon whose
 * lease was taken puts back, dispatches and sends an item its successor is sending) and
 * -DRESEND_UNKNOWN (recovery re-sends what a non-deduplicating provider may have delivered)
 * each make a contact receive a message twice.
 *
 * The steps mirror the kernel's: the claim and its recovery are worker_step's claim
 * (_claim_jobs, recover), a dispatch its step 6, a record its results, undispatch_items the
 * call after a lost connection, the completion _end_job. The dispatch window is one item per
 * step here; the daemon's window of many calls in flight is many such steps.
 */

#ifndef N
#define N 2
#endif
#define W 2
#define CRASHES 1   /* per daemon */
#define PAUSES 1    /* a live lease holder pausing past its lease, in all */
#define BLIPS 1     /* lost database connections per daemon */

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

/* Leases run out: always, eventually, for a dead holder; PAUSES times for a live one. */
active proctype clock() {
end:
    do
    :: atomic { lease && holder_dead -> lease = false }
    :: atomic { lease && !holder_dead && pauses < PAUSES -> pauses++; lease = false }
    od
}

proctype daemon() {
    byte me, i, j, crashes = 0, blips = 0, record_blips = 0;
    bool ok, all_terminal, again = false;
    bool called[N];   /* items handed to the provider in this hold of the job (HeldJob.handed) */

incarnate:
    atomic {
        incarnations++; me = incarnations;
        j = 0;
        do
        :: j < N -> called[j] = false; j++
        :: else -> break
        od
    }

claim:
    atomic {
        if
        :: job_done -> goto done
        :: !job_done && (holder == 0 || !lease) ->
            holder = me; lease = true; holder_dead = false;
            /* a new hold: the daemon makes a new HeldJob, with nothing handed out yet */
            j = 0;
            do
            :: j < N -> called[j] = false; j++
            :: else -> break
            od;
            /* recover what an earlier holder dispatched without recording an outcome */
            i = 0;
            do
            :: i < N ->
                if
                :: status[i] == PENDING && dispatched[i] ->
#if defined(DEDUP) || defined(RESEND_UNKNOWN)
                    dispatched[i] = false   /* sent again under the same idempotency key */
#else
                    status[i] = UNKNOWN; dispatched[i] = false
#endif
                :: else -> skip
                fi;
                i++
            :: else -> break
            od
        fi
    }

work:
    i = 0;
    do
    :: i < N ->
        /* reserve and mark dispatched: one fenced transaction, committed before the call */
        atomic {
            if
            :: HOLDS(me) && status[i] == PENDING && !dispatched[i] -> dispatched[i] = true; ok = true
            :: else -> ok = false
            fi
        }
        if
        :: ok && blips < BLIPS ->
            /* The step committed, but its answer was lost with the connection: this daemon
               never learns it dispatched the item, so never calls. Connected again, it names
               what it did hand out (undispatch_items): the other dispatched items of the job
               it holds go back to undispatched. */
            blips++;
            atomic {
                if
                :: HOLDS(me) ->
                    j = 0;
                    do
                    :: j < N ->
                        if
                        :: status[j] == PENDING && dispatched[j] && !called[j] -> dispatched[j] = false
                        :: else -> skip
                        fi;
                        j++
                    :: else -> break
                    od
                :: else -> skip
                fi
            }
            ok = false;
            again = true                         /* and tries the same item again */
        :: ok ->
            called[i] = true;
            if
            :: crashes < CRASHES -> crashes++; goto crash   /* before the call */
            :: true -> skip
            fi;
            /* the provider call, outside any transaction */
            atomic {
#ifdef DEDUP
                if
                :: delivered[i] == 0 -> delivered[i] = 1
                :: else -> skip                 /* a key it has seen: not delivered again */
                fi
#else
                delivered[i]++
#endif
                assert(delivered[i] <= 1)
            }
            if
            :: crashes < CRASHES -> crashes++; goto crash   /* after it, before recording */
            :: true -> skip
            fi;
record:
            if
            :: record_blips < BLIPS -> record_blips++; goto record   /* connection lost: keep it, retry */
            :: true -> skip
            fi;
            atomic {
                if
                :: HOLDS(me) && status[i] == PENDING ->
                    assert(delivered[i] >= 1);
                    status[i] = SENT; dispatched[i] = false
                :: !HOLDS(me) && status[i] != PENDING -> skip  /* a terminal row never changes */
                :: else -> skip                 /* fenced out: records nothing */
                fi
            }
        :: else -> skip
        fi;
        if
        :: again -> again = false
        :: else -> i++
        fi
    :: else -> break
    od;

    /* complete the job: fenced, and only when every item is terminal */
    atomic {
        all_terminal = true;
        i = 0;
        do
        :: i < N -> all_terminal = all_terminal && status[i] != PENDING; i++
        :: else -> break
        od;
        if
        :: HOLDS(me) && all_terminal -> job_done = true; holder = 0; lease = false; ok = false
        :: HOLDS(me) && !all_terminal -> ok = true      /* still its job: work on */
        :: else -> ok = false
        fi
    }
    if
    :: ok -> goto work
    :: else -> goto claim
    fi

crash:
    atomic {
        if
        :: holder == me -> holder_dead = true
        :: else -> skip
        fi
    }
    goto incarnate

done:
    finished++
}

/* Liveness, under weak fairness (pan -a -f): the job always ends. */
ltl job_ends { <> job_done }

init {
    byte i;
    atomic {
        i = 0;
        do
        :: i < N -> status[i] = PENDING; i++
        :: else -> break
        od;
        i = 0;
        do
        :: i < W -> run daemon(); i++
        :: else -> break
        od
    }
    finished == W;
    assert(job_done);
    i = 0;
    do
    :: i < N ->
        assert(status[i] != PENDING && !dispatched[i]);
        assert(status[i] != SENT || delivered[i] == 1);
#ifdef DEDUP
        assert(status[i] == SENT);
#endif
        i++
    :: else -> break
    od
}
