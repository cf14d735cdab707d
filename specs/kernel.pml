/*
 * Promela model of the kernel's causal delivery and anti-entropy: spec K11 in specs/kernel.md.
 * It checks K2 (causal delivery), K3 (duplicates change nothing) and the convergence part of
 * K1 and K7 (anti-entropy repairs any loss). Check it with
 *
 *   spin -a specs/kernel.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m10000
 *
 * and expect "errors: 0". Giving spin -DBROKEN_DEPS or -DBROKEN_AE (spin -DBROKEN_DEPS -a
 * specs/kernel.pml) compiles one deliberate bug each; spin must report errors for both, so the
 * check cannot pass vacuously. tests/test_spin.py runs all three.
 *
 * Events. Replica i issues LIMi events (at most NE). Event (origin o, seq s) has index
 * e = o*NE + s - 1. The issuer applies it at once; its deps are the issuer's delivered version
 * vector at that moment (so deps[o] == s - 1). Events are immutable, so their envelopes live
 * in global arrays written once; a message names an event by its index.
 *
 * Network. At most NETCAP messages are in flight (the slots net[], kept sorted so that equal
 * contents are one state). Any message in flight may be received next (reordering), received
 * and left in flight to arrive again (duplication), or dropped (loss); a send into a full
 * network is lost. Every run of the model is therefore a run of the real lossy network.
 *
 * Anti-entropy. At any moment replica i may send its digest (version vector) to a peer j;
 * j answers with a page of the events it holds that the digest does not cover, oldest first in
 * a causal order (the implementation uses its delivery order, the model a Lamport order; the
 * argument only needs a causal order). Pages hold one event (the smallest page bound: the
 * implementation bounds pages by bytes), so the requester asks again for the rest. A digest
 * and its answer are taken in one step: a lost digest is a step not taken, a retry is the step
 * taken again, and the answer travels the lossy network. Nothing that matters is lost by that:
 * the answer to an older digest of i is either the answer to i's current vector or an event i
 * has already delivered, a duplicate (a no-op, K3).
 *
 * Phase 1 (chaos) interleaves all of that. Safety is asserted at every delivery: the event's
 * whole causal past was delivered before it (K2) and it was not delivered before (K3). Phase 1
 * may end once every event has been issued. Phase 2 is fairness: the network heals (what was
 * in flight is dropped, then nothing is lost) and every replica syncs with every peer, round
 * after round, until a whole round changes nothing. Then every replica must have delivered
 * every event and hold nothing in its buffer (K1, K7).
 *
 * The defaults (3 replicas issuing 2, 2 and 1 events, 2 messages in flight) check in seconds;
 * -DLIM2=2 or -DNETCAP=3 check larger instances (minutes, gigabytes).
 */

#define NR     3                /* replicas */
#define NE     2                /* most events one replica issues */
#define NEV    6                /* NR * NE: event indices */
#ifndef LIM0
#define LIM0   2                /* events replica 0 issues */
#endif
#ifndef LIM1
#define LIM1   2
#endif
#ifndef LIM2
#define LIM2   1
#endif
#ifndef NETCAP
#define NETCAP 2                /* messages in flight at once (2 or more allows reordering) */
#endif

#define ORIGIN(e)   ((e) / NE)
#define SEQ(e)      ((e) % NE + 1)
#define BIT(e)      (1 << (e))
#define VV(i, k)    vv[(i) * NR + (k)]
#define DEP(e, k)   deps[(e) * NR + (k)]
#define HOLDS(i, e) (SEQ(e) <= VV(i, ORIGIN(e)))
/* A Lamport timestamp, unique per event: the size of its causal past, ties broken by index.
 * Like the HLC it extends causality: an event sorts after everything in its past. */
#define STAMP(e)    ((DEP(e, 0) + DEP(e, 1) + DEP(e, 2)) * NEV + (e))
#define TOTAL       (VV(0, 0) + VV(0, 1) + VV(0, 2) + VV(1, 0) + VV(1, 1) + VV(1, 2) + VV(2, 0) + VV(2, 1) + VV(2, 2))
/* A message: event e for replica `to`; never 0, which marks a free slot. */
#define MSG(to, e)  (1 + (to) * NEV + (e))
#define TO(m)       (((m) - 1) / NEV)
#define EV(m)       (((m) - 1) % NEV)

/* Event envelopes, written once when the event is issued. */
byte deps[NEV * NR];            /* deps[e][k]: the issuer's vv[k] when it issued e */
byte past[NEV];                 /* ghost: the causal past of e, as a set of events */

/* Replicas. */
byte vv[NR * NR];               /* vv[i][k]: highest contiguous seq of origin k delivered at i */
byte buf[NR];                   /* the causal buffer: events received, not yet deliverable */
byte got[NR];                   /* ghost: the set of events delivered at i */

/* Network. */
byte net[NETCAP];               /* messages in flight, sorted descending; 0 = free */

/* Scratch for deterministic steps: always set before use, so not part of the state. */
hidden byte t_e, t_k, t_best, t_more, t_to, t_m;

/* The delivery rule of the causal buffer (mesh/kernel/causal.py): the next seq of its origin, and
 * every dependency delivered. BROKEN_DEPS checks only the origin's own sequence. */
#ifdef BROKEN_DEPS
#define DELIVERABLE(i, e) (SEQ(e) == VV(i, ORIGIN(e)) + 1)
#else
#define DELIVERABLE(i, e) (SEQ(e) == VV(i, ORIGIN(e)) + 1 && \
    DEP(e, 0) <= VV(i, 0) && DEP(e, 1) <= VV(i, 1) && DEP(e, 2) <= VV(i, 2))
#endif

/* Apply event e at replica i. The assertions state the spec, independently of the rule above. */
inline deliver(i, e) {
    assert((got[i] & BIT(e)) == 0);            /* K3: never delivered twice */
    assert((past[e] & ~got[i]) == 0);          /* K2: its whole causal past delivered first */
    got[i] = got[i] | BIT(e);
    buf[i] = buf[i] & ~BIT(e);
    VV(i, ORIGIN(e)) = SEQ(e)
}

/* Deliver buffered events while one is deliverable, oldest stamp first (deterministic). */
inline drain(i) {
    t_more = 1;
    do
    :: t_more ->
        t_best = NEV;
        t_e = 0;
        do
        :: t_e < NEV ->
            if
            :: (buf[i] & BIT(t_e)) && DELIVERABLE(i, t_e) &&
               (t_best == NEV || STAMP(t_e) < STAMP(t_best)) -> t_best = t_e
            :: else -> skip
            fi;
            t_e++
        :: else -> break
        od;
        if
        :: t_best < NEV -> deliver(i, t_best)
        :: else -> t_more = 0
        fi
    :: else -> break
    od
}

/* CausalBuffer.offer: a duplicate (delivered or already buffered) changes nothing (K3);
 * anything else is buffered, never rejected (K2), and then the buffer drains. */
inline offer(i, e) {
    if
    :: HOLDS(i, e) || (buf[i] & BIT(e)) -> skip
    :: else -> buf[i] = buf[i] | BIT(e); drain(i)
    fi
}

/* Replica j answers replica i's digest (i's version vector): t_best := the oldest event, in
 * Lamport order, that j holds and i's vector does not cover (Replica.answer_sync sends its tail
 * in delivery order, also a causal order); NEV when there is none. BROKEN_AE answers the newest
 * one instead. */
inline answer(i, j) {
    t_best = NEV;
    t_e = 0;
    do
    :: t_e < NEV ->
        if
        :: HOLDS(j, t_e) && !HOLDS(i, t_e) &&
#ifdef BROKEN_AE
           (t_best == NEV || STAMP(t_e) > STAMP(t_best)) -> t_best = t_e
#else
           (t_best == NEV || STAMP(t_e) < STAMP(t_best)) -> t_best = t_e
#endif
        :: else -> skip
        fi;
        t_e++
    :: else -> break
    od
}

/* Keep net[] sorted descending, free slots last: one state per multiset of messages. */
inline sort_net() {
    t_k = 0;
    do
    :: t_k + 1 < NETCAP ->
        if
        :: net[t_k] < net[t_k + 1] -> t_m = net[t_k]; net[t_k] = net[t_k + 1]; net[t_k + 1] = t_m; t_k = 0
        :: else -> t_k++
        fi
    :: else -> break
    od
}

/* Put message m in flight: into a free slot, or lost when the network is full. A copy of a
 * message already in flight adds nothing: that one can be received twice anyway. */
inline send(m) {
    t_k = 0;
    do
    :: t_k < NETCAP && net[t_k] != m && net[t_k] != 0 -> t_k++
    :: t_k < NETCAP && net[t_k] == 0 -> net[t_k] = m; break
    :: else -> break
    od;
    sort_net()
}

/* Take message m out of flight (messages in flight are distinct). */
inline unsend(m) {
    t_k = 0;
    do
    :: t_k < NETCAP -> if :: net[t_k] == m -> net[t_k] = 0 :: else -> skip fi; t_k++
    :: else -> break
    od;
    sort_net()
}

/* Replica i issues its next event, applies it and pushes it to every peer. */
inline issue(i) {
    t_best = i * NE + VV(i, i);
    DEP(t_best, 0) = VV(i, 0); DEP(t_best, 1) = VV(i, 1); DEP(t_best, 2) = VV(i, 2);
    past[t_best] = got[i];
    deliver(i, t_best);
    t_to = 0;
    do
    :: t_to < NR ->
        if
        :: t_to != i -> send(MSG(t_to, t_best))
        :: else -> skip
        fi;
        t_to++
    :: else -> break
    od
}

/* Replica i syncs with j: sends its digest, j answers with one page (one event). */
inline sync(i, j) {
    answer(i, j);
    if
    :: t_best < NEV -> send(MSG(i, t_best))
    :: else -> skip
    fi
}

init {
    byte i, j, m, round, before;

    /* Phase 1: an unreliable network; everything interleaves. */
    do
    :: atomic {    /* a replica issues an event and pushes it */
        if
        :: VV(0, 0) < LIM0 -> i = 0
        :: VV(1, 1) < LIM1 -> i = 1
        :: VV(2, 2) < LIM2 -> i = 2
        fi;
        d_step { issue(i) };
        i = 0
       }
    :: atomic {    /* replica i sends its digest to j, which answers */
        if
        :: i = 0; j = 1
        :: i = 0; j = 2
        :: i = 1; j = 0
        :: i = 1; j = 2
        :: i = 2; j = 0
        :: i = 2; j = 1
        fi;
        d_step { sync(i, j) };
        i = 0; j = 0
       }
    :: atomic {    /* a message in flight is received, received and duplicated, or lost */
        if
        :: net[0] -> m = net[0]
        :: NETCAP > 1 && net[1] -> m = net[1]
        :: NETCAP > 2 && net[2] -> m = net[2]
        :: NETCAP > 3 && net[3] -> m = net[3]
        fi;
        if
        :: d_step { unsend(m); offer(TO(m), EV(m)) }; skip    /* received */
        :: d_step { offer(TO(m), EV(m)) }; skip               /* received, a copy stays in flight */
        :: d_step { unsend(m) }; skip                         /* lost */
        fi;
        m = 0
       }
    :: VV(0, 0) == LIM0 && VV(1, 1) == LIM1 && VV(2, 2) == LIM2 -> break
    od;

    /* Phase 2: the network heals. What was in flight is lost; then every replica syncs with
     * every peer (now reliably), until a whole round changes nothing. */
    skip;
    d_step {
        t_k = 0;
        do
        :: t_k < NETCAP -> net[t_k] = 0; t_k++
        :: else -> break
        od;
        round = 1;
        do
        :: round ->
            before = TOTAL;
            i = 0;
            do
            :: i < NR ->
                j = 0;
                do
                :: j < NR ->
                    if
                    :: j != i ->
                        answer(i, j);
                        if
                        :: t_best < NEV -> offer(i, t_best)
                        :: else -> skip
                        fi
                    :: else -> skip
                    fi;
                    j++
                :: else -> break
                od;
                i++
            :: else -> break
            od;
            round = (TOTAL != before)
        :: else -> break
        od;
        i = 0; j = 0; before = 0
    };

    /* Convergence (K1, K7): every replica delivered every event; nothing is left waiting. */
    assert(VV(0, 0) == LIM0 && VV(0, 1) == LIM1 && VV(0, 2) == LIM2);
    assert(VV(1, 0) == LIM0 && VV(1, 1) == LIM1 && VV(1, 2) == LIM2);
    assert(VV(2, 0) == LIM0 && VV(2, 1) == LIM1 && VV(2, 2) == LIM2);
    assert(buf[0] == 0 && buf[1] == 0 && buf[2] == 0)
}
