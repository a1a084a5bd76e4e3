-- 015_didomi_event_guards.sql — a Didomi event older than the stored user snapshot, or deleted.
--
-- A confirmed event older than the stored user snapshot of its regulation changed only the rows that
-- snapshot still carried (their ordering key is the snapshot's). A purpose the snapshot had dropped has
-- no row, so a late event re-inserted it, against PRODUCT §4 ("purposes absent from a newer user
-- snapshot no longer count"), and the outcome depended on arrival order. Likewise a late retry of an
-- event already recorded as deleted applied its choices. Both are now answered stale (the event is still
-- recorded). 002's consent._apply_didomi_event is redefined whole: 002 is released and cannot be edited.

create or replace function consent._apply_didomi_event(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    e          jsonb := d->'event';
    v_type     text := d->>'type';
    v_tenant   text := d->>'tenant';
    v_user     text := d->>'user';
    v_reg      text := d->>'regulation';
    v_id       text := e->>'id';
    v_status   text := e->>'status';
    v_old      text := e->>'old_status';
    v_created  timestamptz := (e->>'created_at')::timestamptz;
    v_updated  timestamptz := coalesce((e->>'updated_at')::timestamptz, (e->>'created_at')::timestamptz);
    s_status   text;
    s_updated  timestamptz;
    s_deleted  boolean;
    v_snapshot timestamptz;
    v_version  bigint;
    v_prior    text;
    v_at       timestamptz;
    v_deleted  timestamptz;
    v_changed  integer;
    v_choices  integer := jsonb_array_length(coalesce(d->'items', '[]')) + jsonb_array_length(coalesce(d->'prefs', '[]'));
begin
    select ev.status, ev.updated_at, ev.deleted into s_status, s_updated, s_deleted
      from consent.didomi_events ev
     where ev.tenant_id = v_tenant and ev.user_id = v_user and ev.event_id = v_id;

    -- Record the event as last seen (the newest version of it wins; a deletion sticks).
    insert into consent.didomi_events as ev
           (tenant_id, user_id, event_id, regulation, status, created_at, updated_at, deleted, consents,
            proofs_id, delegate, last_delivery_id)
    values (v_tenant, v_user, v_id, v_reg, v_status, v_created, v_updated, v_type = 'event.deleted',
            e->'consents', array(select jsonb_array_elements_text(coalesce(e->'proofs_id', '[]'))),
            e->'delegate', p_delivery)
    on conflict (tenant_id, user_id, event_id) do update
       set status           = case when excluded.updated_at >= coalesce(ev.updated_at, '-infinity')
                                   then excluded.status else ev.status end,
           updated_at       = greatest(ev.updated_at, excluded.updated_at),
           consents         = case when excluded.updated_at >= coalesce(ev.updated_at, '-infinity')
                                   then excluded.consents else ev.consents end,
           proofs_id        = case when excluded.updated_at >= coalesce(ev.updated_at, '-infinity')
                                   then excluded.proofs_id else ev.proofs_id end,
           delegate         = coalesce(excluded.delegate, ev.delegate),
           deleted          = ev.deleted or excluded.deleted,
           last_delivery_id = excluded.last_delivery_id;

    if v_type = 'event.deleted' then
        outcome := 'applied';
        reason := 'event recorded as deleted; the user.updated that follows carries the recomputed state';
        return;
    end if;
    if v_status is distinct from 'confirmed' then
        outcome := 'applied';
        reason := format('event is %s: recorded, no state change until it is confirmed', coalesce(v_status, 'without status'));
        return;
    end if;

    if v_type = 'event.updated' then
        -- What the event was before this update: the payload's old_entity, else what we stored.
        v_prior := coalesce(v_old, case when s_updated is null or s_updated < v_updated then s_status end);
        if v_prior = 'confirmed' then
            outcome := 'applied';
            reason := 'update of an already-confirmed event: recorded, no state change';
            return;
        elsif v_prior is not null then
            v_at := v_updated;           -- a confirmation takes effect when it happened
        else
            v_at := v_created;           -- nothing known about the prior status: the event's own time
        end if;
    else
        v_at := v_created;
    end if;

    if s_deleted then
        outcome := 'stale';
        reason := format('event %s was deleted at the source; the user.updated that follows carries the recomputed state', v_id);
        return;
    end if;

    select u.deleted_at into v_deleted
      from consent.users u where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
    if v_deleted is not null then
        outcome := 'stale';
        reason := format('user was deleted at %s; only a newer user snapshot revives it', v_deleted);
        return;
    end if;

    -- A user snapshot is the user's full merged state at its updated_at: an event not newer than it is
    -- already in it, including a purpose the snapshot no longer carries (on a tie the snapshot wins, as
    -- for rows: its tie key sorts after an event's).
    select s.updated_at, s.version into v_snapshot, v_version
      from consent.user_snapshots s
     where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user and s.regulation = v_reg;
    if v_at <= v_snapshot then
        outcome := 'stale';
        reason := format('event %s (effective %s) is not newer than the stored %s user state (version %s, updated_at %s), which includes it',
                         v_id, v_at, v_reg, v_version, v_snapshot);
        return;
    end if;

    v_changed := consent._upsert_consents('didomi', v_tenant, v_user, v_reg, d->'items', v_at, v_at,
                                          'event:' || v_id, 'didomi:event:' || v_id, false, p_delivery)
               + consent._upsert_preferences('didomi', v_tenant, v_user, v_reg, d->'prefs', v_at, v_at,
                                             'event:' || v_id, 'didomi:event:' || v_id, false, p_delivery);
    if v_choices > 0 and v_changed = 0 then
        outcome := 'stale';
        reason := format('every choice of event %s (effective %s) is older than the stored state', v_id, v_at);
        return;
    end if;
    perform consent._upsert_user('didomi', v_tenant, v_user, d->'user_info', v_at, false, false, p_delivery);
    outcome := 'applied';
end
$$;
